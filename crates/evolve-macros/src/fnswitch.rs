//! `#[evolve::switch]` on a static of a function pointer type: a function-pointer switch.
//!
//! For `static HASH: fn(&[u8]) -> u64 = fnv;` the expansion holds:
//!
//! - `__EvolveFn_HASH`, a newtype of the pointer type implementing the engine's `FnPtr`
//!   (`fn_ptr_type!`, so higher-ranked types such as `fn(&[u8]) -> u64` work);
//! - `__EvolveFnSwitch_HASH`, the static's type: it dereferences to
//!   `evolve::multiverse::FnSwitch<__EvolveFn_HASH>` and adds `call`, `get`, `set` and
//!   `committed` with plain function pointers;
//! - the dispatcher `__evolve_fnsw_dispatch_HASH`, an `#[inline(never)]` function of the
//!   switch's signature that calls the switch's committed function, or its value if not
//!   committed; `call` (always inlined) calls it directly, so every call of the switch is a
//!   `call rel32` commit can retarget (a Rust function of the crate, so the compiler calls it
//!   directly, not through the GOT);
//! - the entry stub, an aligned 5-byte `jmp rel32` to the dispatcher under a global label inside
//!   a naked function, declared to Rust through an `unsafe extern` block with the switch's
//!   signature and ABI: the pointer `entry()` hands out, whose jump commit retargets with the
//!   call sites;
//! - the registry entries (a multiverse "function" and a switch).

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use syn::{Error, Expr, ItemStatic, Result, ReturnType, TypeBareFn};

/// The function pointer type of a switch static, if it is one.
pub fn bare_fn(ty: &syn::Type) -> Option<&TypeBareFn> {
    match ty {
        syn::Type::BareFn(f) => Some(f),
        syn::Type::Group(g) => bare_fn(&g.elem),
        syn::Type::Paren(p) => bare_fn(&p.elem),
        _ => None,
    }
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn symbol_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// A symbol name unique in the program: crate, source position and name.
fn stub_symbol(ident: &syn::Ident) -> String {
    let crate_name = std::env::var("CARGO_CRATE_NAME").unwrap_or_else(|_| "crate".into());
    let span = ident.span().unwrap();
    let identity = format!(
        "{crate_name}|{}|{}|{}|{ident}",
        span.file(),
        span.line(),
        span.column()
    );
    format!(
        "__evolve_fnswitch_{}_{ident}_{:016x}",
        symbol_safe(&crate_name),
        fnv1a(&identity)
    )
}

pub fn expand(domain: Option<Vec<Expr>>, item: ItemStatic, f: &TypeBareFn) -> Result<TokenStream> {
    if let Some(token) = &f.unsafety {
        return Err(Error::new_spanned(
            token,
            "a function-pointer switch holds safe functions: `unsafe fn` types are not supported",
        ));
    }
    if let Some(v) = &f.variadic {
        return Err(Error::new_spanned(
            v,
            "a function-pointer switch cannot hold variadic functions",
        ));
    }
    if let Some(l) = &f.lifetimes {
        return Err(Error::new_spanned(
            l,
            "write the function type with elided lifetimes (`fn(&[u8]) -> u64`), not `for<'a>`",
        ));
    }
    if f.inputs.len() > 12 {
        return Err(Error::new_spanned(
            &f.inputs,
            "a function-pointer switch takes at most 12 arguments",
        ));
    }
    let ItemStatic {
        attrs,
        vis,
        ident,
        ty,
        expr,
        ..
    } = item;
    let name = ident.to_string();
    let abi = match &f.abi {
        None => "Rust".to_string(),
        Some(syn::Abi { name: None, .. }) => "C".to_string(),
        Some(syn::Abi { name: Some(n), .. }) => n.value(),
    };
    let extern_abi = syn::LitStr::new(&abi, Span::call_site());
    let types: Vec<&syn::Type> = f.inputs.iter().map(|a| &a.ty).collect();
    let args: Vec<syn::Ident> = (0..types.len())
        .map(|i| format_ident!("__evolve_a{}", i))
        .collect();
    let output = match &f.output {
        ReturnType::Default => quote!(),
        ReturnType::Type(arrow, t) => quote!(#arrow #t),
    };

    let newtype = format_ident!("__EvolveFn_{}", ident);
    let wrapper = format_ident!("__EvolveFnSwitch_{}", ident);
    let dispatch = format_ident!("__evolve_fnsw_dispatch_{}", ident);
    let stub = format_ident!("__evolve_fnsw_stub_{}", ident);
    let stub_definition = format_ident!("__evolve_fnsw_stub_definition_{}", ident);
    let keep = format_ident!("__EVOLVE_FNSW_KEEP_{}", ident);
    let symbol = stub_symbol(&ident);

    let (declared, declared_names) = match domain {
        None => (Vec::new(), Vec::new()),
        Some(values) => {
            let names = values
                .iter()
                .map(|v| quote!(#v).to_string().replace(' ', ""))
                .collect();
            (values, names)
        }
    };
    if declared.len() > 256 {
        return Err(Error::new_spanned(
            &ident,
            "a function-pointer switch declares at most 256 functions",
        ));
    }
    let run = quote!(::evolve::multiverse);

    Ok(quote! {
        #run::__private::fn_ptr_type! {
            #[doc(hidden)]
            #[allow(non_camel_case_types)]
            #vis struct #newtype(extern #extern_abi fn(#(#types),*) #output);
        }

        #[doc(hidden)]
        #[allow(non_camel_case_types)]
        #vis struct #wrapper(#run::FnSwitch<#newtype>);

        #[allow(dead_code)]
        impl #wrapper {
            /// Calls the switch's function: before a commit (and after a revert) the current
            /// value, through the dispatcher; once committed, the committed function, directly
            /// (commit rewrites this call of the dispatcher).
            #[inline(always)]
            #vis fn call(&self, #(#args: #types),*) #output {
                #dispatch(#(#args),*)
            }

            /// The current value: what the next commit binds, and what uncommitted calls run.
            #[inline(always)]
            #vis fn get(&self) -> #ty {
                self.0.get().0
            }

            /// Changes the value; committed calls keep their binding until the next commit.
            #vis fn set(&self, f: #ty) {
                self.0.set(#newtype(f))
            }

            /// The function committed call sites call, or `None` if not committed.
            #vis fn committed(&self) -> ::core::option::Option<#ty> {
                self.0.committed().map(|f| f.0)
            }
        }

        impl ::core::ops::Deref for #wrapper {
            type Target = #run::FnSwitch<#newtype>;
            fn deref(&self) -> &#run::FnSwitch<#newtype> {
                &self.0
            }
        }

        impl #run::AnySwitch for #wrapper {
            fn name(&self) -> &'static str {
                #run::AnySwitch::name(&self.0)
            }
            fn raw(&self) -> u64 {
                #run::AnySwitch::raw(&self.0)
            }
            fn id(&self) -> usize {
                #run::AnySwitch::id(&self.0)
            }
            fn domain(&self) -> &'static [u64] {
                #run::AnySwitch::domain(&self.0)
            }
            fn set_raw(&self, raw: u64) {
                #run::AnySwitch::set_raw(&self.0, raw)
            }
        }

        #(#attrs)*
        #vis static #ident: #wrapper = #wrapper(#run::FnSwitch::new(
            #name,
            #newtype(#expr),
            #newtype(#stub),
            #newtype(#dispatch),
            &[#(#newtype(#declared)),*],
            &[#(#declared_names),*],
        ));

        /// The indirect path of the switch: calls its committed function, or its value if it
        /// is not committed.
        #[doc(hidden)]
        #[inline(never)]
        #[allow(non_snake_case, improper_ctypes_definitions)]
        extern #extern_abi fn #dispatch(#(#args: #types),*) #output {
            (#ident.0.route().0)(#(#args),*)
        }

        // The entry stub: one `jmp rel32` to the dispatcher, spelled as bytes so that the
        // assembler cannot shorten it, alone in an aligned 8-byte word (the engine retargets it
        // with one atomic store), under a label of its own. It lives in a naked function because
        // `global_asm!` is refused inside function bodies; the `#[used]` static makes sure the
        // compiler emits it, since Rust code reaches the label only through the declaration
        // below.
        #[doc(hidden)]
        #[unsafe(naked)]
        #[allow(unsafe_code, non_snake_case)]
        #[unsafe(link_section = ".text.evolve_fnswitch")]
        extern "C-unwind" fn #stub_definition() {
            // SAFETY: never called as itself: its label `#symbol` is the switch's entry stub, a
            // jump to the dispatcher (see the declaration of `#stub` below).
            ::core::arch::naked_asm!(
                // A trap first, so the label does not share the function's address (tools
                // would see two names for one function).
                "int3",
                ".balign 8, 0xcc",
                concat!(".globl ", #symbol),
                concat!(".hidden ", #symbol),
                concat!(".type ", #symbol, ",@function"),
                concat!(#symbol, ":"),
                ".byte 0xe9",
                ".long {dispatch} - . - 4",
                concat!(".size ", #symbol, ", 5"),
                ".balign 8, 0xcc",
                dispatch = sym #dispatch,
            )
        }

        #[used]
        #[allow(non_upper_case_globals)]
        static #keep: extern "C-unwind" fn() = #stub_definition;

        // SAFETY: the symbol is the stub defined by the naked function above: a `jmp` to the
        // dispatcher, a function of exactly this signature and ABI, which leaves registers and
        // stack as the caller set them, so calling the stub is calling the dispatcher.
        // `evolve::multiverse::commit` retargets it (as a branch to the dispatcher) only to
        // values of the switch, functions of this same type (the engine's typed `FnPtr` APIs).
        #[allow(unsafe_code, improper_ctypes)]
        unsafe extern #extern_abi {
            #[link_name = #symbol]
            safe fn #stub(#(#args: #types),*) #output;
        }

        const _: () = {
            #[#run::__private::linkme::distributed_slice(#run::__private::FUNCTIONS)]
            #[linkme(crate = #run::__private::linkme)]
            static FUNCTION: &'static dyn #run::__private::Function = &#ident.0;

            #[#run::__private::linkme::distributed_slice(#run::__private::SWITCHES)]
            #[linkme(crate = #run::__private::linkme)]
            static SWITCH: &'static dyn #run::AnySwitch = &#ident.0;
        };
    })
}
