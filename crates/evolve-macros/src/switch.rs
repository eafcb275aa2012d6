//! `#[evolve::switch]` and `#[derive(SwitchValue)]`.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::parse::{Parse, ParseStream};
use syn::{Error, Expr, ItemStatic, Result, Token};

/// The most values a range domain may expand to.
const MAX_RANGE: i128 = 256;

enum Domain {
    /// The type's own domain (bool, enums).
    Implied,
    /// Explicit values.
    Values(Vec<Expr>),
}

impl Parse for Domain {
    fn parse(input: ParseStream) -> Result<Domain> {
        if input.is_empty() {
            return Ok(Domain::Implied);
        }
        input.parse::<Token![in]>()?;
        let expr: Expr = input.parse()?;
        match expr {
            Expr::Array(array) => Ok(Domain::Values(array.elems.into_iter().collect())),
            Expr::Range(range) => {
                let bound = |e: &Option<Box<Expr>>| -> Result<i128> {
                    let e = e.as_deref().ok_or_else(|| {
                        Error::new_spanned(&range, "a domain range needs both ends")
                    })?;
                    int_literal(e)
                };
                let start = bound(&range.start)?;
                let mut end = bound(&range.end)?;
                if matches!(range.limits, syn::RangeLimits::HalfOpen(_)) {
                    end -= 1;
                }
                if end < start || end - start + 1 > MAX_RANGE {
                    return Err(Error::new_spanned(
                        &range,
                        format!("a switch domain range must hold 1 to {MAX_RANGE} values"),
                    ));
                }
                let values = (start..=end)
                    .map(|v| syn::parse_str::<Expr>(&v.to_string()))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Domain::Values(values))
            }
            other => Err(Error::new_spanned(
                other,
                "expected a domain: `in 0..=3` or `in [a, b, c]`",
            )),
        }
    }
}

fn int_literal(e: &Expr) -> Result<i128> {
    match e {
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(i),
            ..
        }) => i.base10_parse(),
        Expr::Unary(syn::ExprUnary {
            op: syn::UnOp::Neg(_),
            expr,
            ..
        }) => Ok(-int_literal(expr)?),
        Expr::Paren(p) => int_literal(&p.expr),
        other => Err(Error::new_spanned(other, "expected an integer literal")),
    }
}

/// The name of the hidden constant holding a switch's domain.
pub fn domain_const(name: &syn::Ident) -> syn::Ident {
    format_ident!("__EVOLVE_DOMAIN_{}", name)
}

pub fn expand(attr: TokenStream, item: TokenStream) -> Result<TokenStream> {
    let domain: Domain = syn::parse2(attr)?;
    let item: ItemStatic = syn::parse2(item)?;
    if !matches!(item.mutability, syn::StaticMutability::None) {
        return Err(Error::new_spanned(
            &item.mutability,
            "a switch is written with `.set()`: declare it without `mut`",
        ));
    }
    if let Some(f) = crate::fnswitch::bare_fn(&item.ty) {
        let declared = match domain {
            Domain::Implied => None,
            Domain::Values(values) => Some(values),
        };
        let f = f.clone();
        return crate::fnswitch::expand(declared, item, &f);
    }
    let ItemStatic {
        attrs,
        vis,
        ident,
        ty,
        expr,
        ..
    } = item;
    let domain_ident = domain_const(&ident);
    let name = ident.to_string();
    let domain_expr = match domain {
        Domain::Implied => {
            let message = format!(
                "switch `{name}`: its type has no implied domain; declare one: #[evolve::switch(in 0..=3)]"
            );
            quote! {
                match <#ty as ::evolve::multiverse::SwitchValue>::DOMAIN {
                    ::core::option::Option::Some(d) => d,
                    ::core::option::Option::None => ::core::panic!(#message),
                }
            }
        }
        Domain::Values(values) => quote! {
            &[#( { let v: #ty = #values; v } as u64 ),*]
        },
    };
    Ok(quote! {
        #(#attrs)*
        #vis static #ident: ::evolve::multiverse::Switch<#ty> =
            ::evolve::multiverse::Switch::new(#name, { let v: #ty = #expr; v } as u64, #domain_ident);

        #[doc(hidden)]
        #[allow(non_upper_case_globals)]
        #vis const #domain_ident: &[u64] = #domain_expr;

        const _: () = {
            #[::evolve::multiverse::__private::linkme::distributed_slice(::evolve::multiverse::__private::SWITCHES)]
            #[linkme(crate = ::evolve::multiverse::__private::linkme)]
            static ENTRY: &'static dyn ::evolve::multiverse::AnySwitch = &#ident;
        };
    })
}

pub fn derive(item: TokenStream) -> Result<TokenStream> {
    let item: syn::DeriveInput = syn::parse2(item)?;
    let syn::Data::Enum(data) = &item.data else {
        return Err(Error::new_spanned(
            &item.ident,
            "SwitchValue derives for fieldless enums",
        ));
    };
    if !item.generics.params.is_empty() {
        return Err(Error::new_spanned(
            &item.generics,
            "SwitchValue enums cannot be generic",
        ));
    }
    let mut variants = Vec::new();
    for v in &data.variants {
        if !matches!(v.fields, syn::Fields::Unit) {
            return Err(Error::new_spanned(
                v,
                "SwitchValue enums have fieldless variants only",
            ));
        }
        variants.push(&v.ident);
    }
    if variants.is_empty() {
        return Err(Error::new_spanned(
            &item.ident,
            "a switch domain needs a variant",
        ));
    }
    let ident = &item.ident;
    let first = variants[0];
    Ok(quote! {
        impl ::evolve::multiverse::SwitchValue for #ident {
            const DOMAIN: ::core::option::Option<&'static [u64]> =
                ::core::option::Option::Some(&[#(#ident::#variants as u64),*]);
            #[inline(always)]
            fn to_raw(self) -> u64 {
                self as u64
            }
            #[inline(always)]
            fn from_raw(raw: u64) -> #ident {
                #( if raw == #ident::#variants as u64 { return #ident::#variants; } )*
                // Raw values only come from `to_raw` and the domain.
                #ident::#first
            }
        }
    })
}
