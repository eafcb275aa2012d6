//! `#[evolve::multiverse(SWITCHES...)]`: the generic body, the variant table, the entry stub and
//! the registry entry of one function.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::visit_mut::VisitMut;
use syn::{Error, Expr, FnArg, ItemFn, Path, Result, ReturnType, Token};

/// Mirrors `evolve_multiverse::MAX_VARIANTS`.
const MAX_VARIANTS: usize = 64;

struct SwitchArg {
    path: Path,
    /// `Some` for partial specialisation: only these values get variants.
    values: Option<Vec<Expr>>,
}

impl Parse for SwitchArg {
    fn parse(input: ParseStream) -> Result<SwitchArg> {
        let path: Path = input.parse()?;
        let values = if input.peek(Token![=]) {
            input.parse::<Token![=]>()?;
            match input.parse::<Expr>()? {
                Expr::Array(a) => Some(a.elems.into_iter().collect()),
                other => {
                    return Err(Error::new_spanned(
                        other,
                        "expected the values to specialise for: `SWITCH = [a, b]`",
                    ))
                }
            }
        } else {
            None
        };
        Ok(SwitchArg { path, values })
    }
}

struct Args(Vec<SwitchArg>);

impl Parse for Args {
    fn parse(input: ParseStream) -> Result<Args> {
        let list = Punctuated::<SwitchArg, Token![,]>::parse_terminated(input)?;
        Ok(Args(list.into_iter().collect()))
    }
}

/// Replaces `SWITCH.get()` with a read bound to the variant's constant.
struct Rewrite<'a> {
    switches: &'a [(String, syn::Ident)],
}

impl VisitMut for Rewrite<'_> {
    fn visit_expr_mut(&mut self, expr: &mut Expr) {
        if let Expr::MethodCall(call) = expr {
            if call.method == "get" && call.args.is_empty() {
                if let Expr::Path(p) = &*call.receiver {
                    let key = path_key(&p.path);
                    if let Some((_, param)) = self.switches.iter().find(|(k, _)| *k == key) {
                        let receiver = &call.receiver;
                        *expr = syn::parse_quote! {
                            ::evolve::multiverse::__private::read::<_, #param>(&#receiver)
                        };
                        return;
                    }
                }
            }
        }
        syn::visit_mut::visit_expr_mut(self, expr);
    }

    // Nested items cannot see the variant's parameters.
    fn visit_item_mut(&mut self, _: &mut syn::Item) {}
}

fn path_key(path: &Path) -> String {
    quote!(#path).to_string().replace(' ', "")
}

pub fn expand(attr: TokenStream, item: TokenStream) -> Result<TokenStream> {
    let Args(args) = syn::parse2(attr)?;
    let mut func: ItemFn = syn::parse2(item)?;
    let sig = &func.sig;
    if args.is_empty() {
        return Err(Error::new_spanned(
            sig,
            "list the switches to specialise for: #[evolve::multiverse(A, B)]",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(Error::new_spanned(
            &sig.generics,
            "multiverse functions cannot be generic",
        ));
    }
    if let Some(token) = sig.asyncness {
        return Err(Error::new_spanned(
            token,
            "multiverse functions cannot be async",
        ));
    }
    if let Some(token) = sig.constness {
        return Err(Error::new_spanned(
            token,
            "multiverse functions cannot be const",
        ));
    }
    if let Some(token) = sig.unsafety {
        return Err(Error::new_spanned(
            token,
            "multiverse functions cannot be unsafe",
        ));
    }
    if let Some(v) = &sig.variadic {
        return Err(Error::new_spanned(
            v,
            "multiverse functions cannot be variadic",
        ));
    }
    let mut types = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => {
                return Err(Error::new_spanned(
                    r,
                    "multiverse functions are free functions (no `self`)",
                ))
            }
            FnArg::Typed(t) => {
                if matches!(*t.ty, syn::Type::ImplTrait(_)) {
                    return Err(Error::new_spanned(
                        &t.ty,
                        "multiverse functions cannot be generic",
                    ));
                }
                types.push(t.ty.clone());
            }
        }
    }
    if args.len() > 6 {
        return Err(Error::new_spanned(
            sig,
            "a multiverse function reads at most 6 switches",
        ));
    }
    let output = match &sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, ty) => quote!(#ty),
    };
    let name = sig.ident.clone();
    let name_str = name.to_string();
    let vis = func.vis.clone();
    let fn_type = quote!(extern "C-unwind" fn(#(#types),*) -> #output);

    let body_ident = format_ident!("__evolve_mv_body_{}", name);
    let stub_ident = format_ident!("__evolve_mv_stub_{}", name);
    let opts_ident = format_ident!("__EVOLVE_MV_OPTIONS_{}", name);
    let table_ident = format_ident!("__EVOLVE_MV_TABLE_{}", name);
    let def_ident = format_ident!("__EVOLVE_MV_{}", name);

    let params: Vec<syn::Ident> = (0..args.len()).map(|j| format_ident!("__V{}", j)).collect();
    let keyed: Vec<(String, syn::Ident)> = args
        .iter()
        .zip(&params)
        .map(|(a, p)| (path_key(&a.path), p.clone()))
        .collect();
    Rewrite { switches: &keyed }.visit_block_mut(&mut func.block);

    // Options per switch, and the compile-time checks.
    let mut options = Vec::new();
    let mut checks = Vec::new();
    let switch_paths: Vec<&Path> = args.iter().map(|a| &a.path).collect();
    let names: Vec<String> = args.iter().map(|a| path_key(&a.path)).collect();
    for arg in &args {
        let mut domain_path = arg.path.clone();
        let last = domain_path
            .segments
            .last_mut()
            .expect("a path has a segment");
        last.ident = crate::switch::domain_const(&last.ident);
        match &arg.values {
            None => options.push(quote! {
                &::evolve::multiverse::__private::domain_options::<{ #domain_path.len() }>(#domain_path)
            }),
            Some(values) => {
                let message = format!(
                    "multiverse `{name_str}`: a value listed for `{}` is not in its domain",
                    path_key(&arg.path)
                );
                checks.push(quote! {
                    const _: () = ::core::assert!(
                        ::evolve::multiverse::__private::within(&[#((#values) as u64),*], #domain_path),
                        #message
                    );
                });
                options.push(quote! {
                    &[#((#values) as u64 as u128,)* ::evolve::multiverse::__private::UNBOUND]
                });
            }
        }
    }
    let limit_message = format!(
        "multiverse `{name_str}`: the variants of {} exceed the limit of {MAX_VARIANTS}; \
         specialise fewer switches or list values (`SWITCH = [a, b]`)",
        names.join(" × ")
    );

    let unbound: Vec<TokenStream> = params
        .iter()
        .map(|_| quote!({ ::evolve::multiverse::__private::UNBOUND }))
        .collect();
    let slots: Vec<TokenStream> = (0..MAX_VARIANTS)
        .map(|s| {
            let values = (0..args.len()).map(
                |j| quote!({ ::evolve::multiverse::__private::slot_value(#opts_ident, #s, #j) }),
            );
            quote!(#body_ident::<#(#values),*>)
        })
        .collect();

    let stub_args: Vec<syn::Ident> = (0..types.len())
        .map(|i| format_ident!("__a{}", i))
        .collect();
    let (attrs_doc, attrs_other): (Vec<_>, Vec<_>) = func
        .attrs
        .iter()
        .cloned()
        .partition(|a| a.path().is_ident("doc"));
    let inputs = &func.sig.inputs;
    let block = &func.block;

    Ok(quote! {
        #(#attrs_other)*
        #[inline(never)]
        #[allow(improper_ctypes_definitions, non_snake_case, clippy::needless_return)]
        extern "C-unwind" fn #body_ident<#(const #params: u128),*>(#inputs) -> #output #block

        #[allow(unsafe_code, improper_ctypes_definitions, non_snake_case, unused_variables)]
        #[unsafe(naked)]
        extern "C-unwind" fn #stub_ident(#(#stub_args: #types),*) -> #output {
            // SAFETY: the entry stub is one `jmp rel32` (encoded by hand so the assembler cannot
            // shorten it) to the generic body, a function of the same signature and ABI, so
            // calling the stub is calling the body with the caller's registers and stack.
            // `evolve::multiverse::commit` retargets it, only to bodies of this signature.
            ::core::arch::naked_asm!(
                ".byte 0xe9",
                ".long {body} - . - 4",
                body = sym #body_ident::<#(#unbound),*>,
            )
        }

        #(#attrs_doc)*
        #[allow(non_upper_case_globals)]
        #vis const #name: #fn_type = #stub_ident;

        #[allow(non_upper_case_globals)]
        const #opts_ident: &[&[u128]] = &[#(#options),*];

        #(#checks)*
        const _: () = ::core::assert!(
            ::evolve::multiverse::__private::slots(#opts_ident) <= #MAX_VARIANTS,
            #limit_message
        );

        #[allow(non_upper_case_globals)]
        static #table_ident: [#fn_type; #MAX_VARIANTS] = [#(#slots),*];

        #[allow(non_upper_case_globals)]
        static #def_ident: ::evolve::multiverse::Multiversed<#fn_type> =
            ::evolve::multiverse::Multiversed::new(
                #name_str,
                #stub_ident,
                #body_ident::<#(#unbound),*>,
                &#table_ident,
                &[#(&#switch_paths),*],
                #opts_ident,
            );

        const _: () = {
            #[::evolve::multiverse::__private::linkme::distributed_slice(::evolve::multiverse::__private::FUNCTIONS)]
            #[linkme(crate = ::evolve::multiverse::__private::linkme)]
            static ENTRY: &'static dyn ::evolve::multiverse::__private::Function = &#def_ident;
        };
    })
}
