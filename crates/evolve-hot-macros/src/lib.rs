//! `#[evolve::hot]`: makes functions hot-updatable.
//!
//! On a free function, or on an inherent `impl` block (every method in it), the attribute splits
//! each function into:
//!
//! - the function callers see, `#[inline(always)]`, which calls the **stub**;
//! - the **stub** `__evolve_stub_{id}`: a naked function holding an aligned 5-byte `jmp rel32`,
//!   the patch site that an update retargets;
//! - the **implementation** `__evolve_impl_{id}_{fingerprint}`: the original body, exported under
//!   a name that a patch built from edited source shares;
//! - an entry in the engine's link-time table of stubs (name, id, signature fingerprint,
//!   addresses): nothing runs at start-up.
//!
//! The `id` is derived from the crate, the source file, the impl's type and the function name,
//! so the host and a patch built from edited source agree on it; the fingerprint hashes the
//! parameter and return types, so a patch that changes a signature is recognised.
//!
//! An `async fn` (free or method) becomes a hot function returning its future boxed, so that
//! futures in flight finish on the version they started with (see `async_fn`).
//!
//! Generic and `const` functions, trait impls and C-variadic functions are refused with an error
//! that says what to do instead; in an `impl` block, such methods stay ordinary methods and the
//! others are prepared. Lifetime parameters (of the function or of the impl) are fine.

#![forbid(unsafe_code)]

mod async_fn;

mod canary;

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, ToTokens};
use syn::visit_mut::VisitMut;
use syn::{
    parse_macro_input, FnArg, ImplItem, ImplItemFn, Item, ItemFn, ItemImpl, Pat, ReturnType,
    Signature, Type,
};

/// Makes a function, or every method of an inherent `impl` block, hot-updatable.
///
/// ```ignore
/// #[evolve::hot]
/// pub fn price(quantity: u64) -> u64 {
///     quantity * 10
/// }
/// ```
#[proc_macro_attribute]
pub fn hot(attr: TokenStream, item: TokenStream) -> TokenStream {
    hot_tokens(attr.into(), item.into())
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

/// `#[evolve::hot]` on `proc_macro2` tokens: what [`hot`] expands to, or the error it reports
/// (a function of its own so that the refusals are tested without compiling a crate).
fn hot_tokens(attr: TokenStream2, item: TokenStream2) -> syn::Result<TokenStream2> {
    // `local`: the futures of async functions need not be `Send`.
    let send = match attr.to_string().as_str() {
        "" => true,
        "local" => false,
        _ => {
            return Err(syn::Error::new(
                Span::call_site(),
                "#[evolve::hot] takes no arguments, or `local` (async functions whose futures \
                 are not Send)",
            ))
        }
    };
    match syn::parse2::<Item>(item)? {
        Item::Fn(f) => hot_fn(f, send),
        Item::Impl(i) => hot_impl(i, send),
        other => Err(syn::Error::new_spanned(
            other,
            "#[evolve::hot] applies to a function or an inherent impl block",
        )),
    }
}

/// Marks a function with the *old* signature of a hot function whose signature a patch changes
/// (K42's adaptors): callers compiled against the old signature reach the adaptor, which calls
/// the new function. The argument names the hot function (`name`, or `Type::method` for a
/// method, whose receiver the adaptor takes as its first parameter); the adaptor must be in the
/// same source file.
///
/// ```ignore
/// #[evolve::hot]
/// pub fn price(quantity: u64, discount: u32) -> u64 { /* new signature */ }
///
/// #[evolve::adaptor(price)]
/// fn price_before_discounts(quantity: u64) -> u64 {
///     price(quantity, 0)
/// }
/// ```
#[proc_macro_attribute]
pub fn adaptor(attr: TokenStream, item: TokenStream) -> TokenStream {
    let target = parse_macro_input!(attr as syn::Path);
    let f = parse_macro_input!(item as ItemFn);
    adaptor_fn(target, f)
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

fn adaptor_fn(target: syn::Path, f: ItemFn) -> syn::Result<TokenStream2> {
    let segments: Vec<_> = target.segments.iter().collect();
    let (self_ty, name): (Option<Type>, syn::Ident) = match segments.as_slice() {
        [name] => (None, name.ident.clone()),
        [ty, name] => {
            let ty_ident = &ty.ident;
            (Some(syn::parse_quote!(#ty_ident)), name.ident.clone())
        }
        _ => {
            return Err(syn::Error::new_spanned(
                &target,
                "#[evolve::adaptor] takes the hot function's name, or `Type::method`",
            ))
        }
    };
    // The adaptor's identity is the hot function's; its fingerprint is its own (old) signature.
    let mut as_target = f.sig.clone();
    as_target.ident = name;
    let p = prepare(&as_target, self_ty.as_ref(), &[])?;
    let export = format!("__evolve_adaptor_{}_{:016x}", p.id, p.fingerprint);
    // Old callers reach the adaptor through the stub: it needs the stubs' ABI.
    let mut f = f;
    f.sig.abi = Some(syn::parse_quote!(extern "C-unwind"));
    Ok(quote! {
        #[doc(hidden)]
        #[allow(unsafe_code, improper_ctypes_definitions)]
        #[unsafe(export_name = #export)]
        #[inline(never)]
        #f
    })
}

/// Marks a state-transfer function for a static whose type changed in a patch: it receives the
/// program's value in the old layout and returns the value in the new one. It runs once, while
/// every thread that uses safe points is held at one, before the patch's functions take over.
///
/// The static must have interior mutability (atomics, `Mutex`, ...), since its new value is
/// written in place: a static of another type is a compile error (the type must implement
/// `evolve::code::InteriorMutable`). Code outside the patch compiled against the old layout keeps the old
/// static; make the readers hot functions of the patched crate.
///
/// ```ignore
/// pub static CALLS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
///
/// #[evolve::transfer(CALLS)]
/// fn calls_from_v1(old: &AtomicU64) -> [AtomicU64; 2] {
///     [AtomicU64::new(old.load(Ordering::Relaxed)), AtomicU64::new(0)]
/// }
/// ```
#[proc_macro_attribute]
pub fn transfer(attr: TokenStream, item: TokenStream) -> TokenStream {
    let target = parse_macro_input!(attr as syn::Ident);
    let f = parse_macro_input!(item as ItemFn);
    transfer_fn(target, f)
        .unwrap_or_else(|e| e.to_compile_error())
        .into()
}

fn transfer_fn(target: syn::Ident, f: ItemFn) -> syn::Result<TokenStream2> {
    let shape_error = || {
        syn::Error::new_spanned(
            &f.sig,
            "#[evolve::transfer(STATIC)] takes `fn(old: &OldType) -> NewType`",
        )
    };
    let old_type = match f.sig.inputs.first() {
        Some(FnArg::Typed(t)) if f.sig.inputs.len() == 1 => match &*t.ty {
            Type::Reference(r) => (*r.elem).clone(),
            _ => return Err(shape_error()),
        },
        _ => return Err(shape_error()),
    };
    if matches!(f.sig.output, ReturnType::Default) {
        return Err(shape_error());
    }
    let crate_name = std::env::var("CARGO_CRATE_NAME").unwrap_or_else(|_| "crate".into());
    let export = format!("__evolve_transfer_{}__{}", symbol_safe(&crate_name), target);
    let name = &f.sig.ident;
    let wrapper = format_ident!("__evolve_transfer_{}", target);
    let check = format_ident!("__evolve_transfer_target_is_interior_mutable_{}", target);
    Ok(quote! {
        #f

        // The write below is sound only over interior-mutable memory: refuse anything else at
        // compile time.
        #[doc(hidden)]
        #[allow(non_snake_case, dead_code)]
        fn #check() {
            fn require<T: ?Sized + ::evolve::hot::__private::InteriorMutable>(_: &T) {}
            require(&#target);
        }

        #[doc(hidden)]
        #[allow(unsafe_code, non_snake_case)]
        #[unsafe(export_name = #export)]
        extern "C" fn #wrapper(old: *const u8) {
            // SAFETY: Evolve calls this once, at a safe point, with the address of the running
            // program's instance of the static in its old layout (`&OldType`), which stays
            // valid (`PatchObject::transfer_static` finds it by name); the new value is written
            // over the patch's own instance, whose type is `InteriorMutable` (checked above at
            // compile time), so no shared reference to it is invalidated by the write.
            unsafe {
                let old = &*(old as *const #old_type);
                let new = #name(old);
                let slot = ::core::ptr::addr_of!(#target) as *mut _;
                ::core::ptr::drop_in_place(slot);
                ::core::ptr::write(slot, new);
            }
        }
    })
}

/// FNV-1a: stable across compilers and runs, unlike `DefaultHasher`.
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

fn compact(tokens: impl ToTokens) -> String {
    tokens.to_token_stream().to_string().replace(' ', "")
}

fn check_signature(sig: &Signature) -> syn::Result<()> {
    let refuse = |tokens: &dyn ToTokens, what: &str| {
        Err(syn::Error::new_spanned(
            tokens.to_token_stream(),
            format!("#[evolve::hot] cannot prepare {what}"),
        ))
    };
    if sig.asyncness.is_some() {
        return refuse(
            &sig.asyncness,
            "an async adaptor: give it the signature the hot async fn has once prepared, \
             `fn(…) -> Pin<Box<dyn Future<Output = T> + Send + '_>>`",
        );
    }
    if sig.constness.is_some() {
        return refuse(
            &sig.constness,
            "a const fn: it may be evaluated at compile time",
        );
    }
    if sig.variadic.is_some() {
        return refuse(&sig.variadic, "a C-variadic function");
    }
    if sig.abi.is_some() {
        return refuse(
            &sig.abi,
            "a function with an explicit ABI: use the Rust ABI",
        );
    }
    if let Some(param) = sig
        .generics
        .params
        .iter()
        .find(|p| !matches!(p, syn::GenericParam::Lifetime(_)))
    {
        return refuse(
            param,
            "a generic function (every instantiation is separate code): make a hot \
             non-generic function for each type you need, or a hot function taking `&dyn Trait`",
        );
    }
    let impl_trait_arg = sig
        .inputs
        .iter()
        .find(|a| matches!(a, FnArg::Typed(t) if matches!(*t.ty, Type::ImplTrait(_))));
    if let Some(arg) = impl_trait_arg {
        return refuse(arg, "`impl Trait` arguments (a hidden generic)");
    }
    Ok(())
}

/// Replaces `Self` with the impl's type, so signatures can be written outside the impl.
struct ReplaceSelf<'a>(&'a Type);

impl VisitMut for ReplaceSelf<'_> {
    fn visit_type_mut(&mut self, ty: &mut Type) {
        if let Type::Path(p) = ty {
            if p.qself.is_none() && p.path.is_ident("Self") {
                *ty = self.0.clone();
                return;
            }
        }
        syn::visit_mut::visit_type_mut(self, ty);
    }
}

/// Replaces every named lifetime with `'_`.
struct ElideLifetimes;

impl VisitMut for ElideLifetimes {
    fn visit_lifetime_mut(&mut self, lifetime: &mut syn::Lifetime) {
        if lifetime.ident != "static" {
            *lifetime = syn::Lifetime::new("'_", lifetime.span());
        }
    }
}

/// What the generated pieces need to know about one function.
struct Prepared {
    /// The parameter types, `Self` replaced, receiver included.
    param_types: Vec<Type>,
    output: ReturnType,
    id: String,
    fingerprint: u64,
    /// The function's display path below `module_path!()`.
    display: String,
    /// The lifetime parameters the signature uses (the impl's and the function's): the stub,
    /// a module-level item, declares them itself.
    lifetimes: Vec<syn::LifetimeParam>,
}

fn prepare(
    sig: &Signature,
    self_ty: Option<&Type>,
    impl_lifetimes: &[syn::LifetimeParam],
) -> syn::Result<Prepared> {
    check_signature(sig)?;
    let mut lifetimes = impl_lifetimes.to_vec();
    lifetimes.extend(sig.generics.lifetimes().cloned());
    let replace = |ty: &Type| {
        let mut ty = ty.clone();
        if let Some(s) = self_ty {
            ReplaceSelf(s).visit_type_mut(&mut ty);
        }
        ty
    };
    let mut param_types = Vec::new();
    for input in &sig.inputs {
        param_types.push(match input {
            FnArg::Receiver(r) => replace(&r.ty),
            FnArg::Typed(t) => replace(&t.ty),
        });
    }
    let output = match &sig.output {
        ReturnType::Default => ReturnType::Default,
        ReturnType::Type(arrow, ty) => ReturnType::Type(*arrow, Box::new(replace(ty))),
    };
    let crate_name = std::env::var("CARGO_CRATE_NAME").unwrap_or_else(|_| "crate".into());
    let file = Span::call_site().unwrap().file();
    let self_text = self_ty.map(compact).unwrap_or_default();
    let name = sig.ident.to_string();
    let identity = format!("{crate_name}|{file}|{self_text}|{name}");
    let id = format!(
        "{}_{}{}_{:08x}",
        symbol_safe(&crate_name),
        if self_text.is_empty() {
            String::new()
        } else {
            format!("{}_", symbol_safe(&self_text))
        },
        name,
        fnv1a(&identity) as u32
    );
    let signature_text = format!(
        "fn({})->{}",
        param_types
            .iter()
            .map(compact)
            .collect::<Vec<_>>()
            .join(","),
        compact(&output)
    );
    let display = if self_text.is_empty() {
        name
    } else {
        format!("{self_text}::{name}")
    };
    Ok(Prepared {
        param_types,
        output,
        id,
        fingerprint: fnv1a(&signature_text),
        display,
        lifetimes,
    })
}

/// The wrapper's parameter list and the argument list that forwards it to the stub.
fn forwarding(sig: &Signature) -> (Vec<TokenStream2>, Vec<TokenStream2>) {
    let mut params = Vec::new();
    let mut args = Vec::new();
    for (i, input) in sig.inputs.iter().enumerate() {
        match input {
            FnArg::Receiver(r) => {
                params.push(r.to_token_stream());
                args.push(quote!(self));
            }
            FnArg::Typed(t) => {
                let name = match &*t.pat {
                    Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => p.ident.clone(),
                    _ => format_ident!("__evolve_arg{}", i),
                };
                let ty = &t.ty;
                let attrs = &t.attrs;
                params.push(quote!(#(#attrs)* #name: #ty));
                args.push(quote!(#name));
            }
        }
    }
    (params, args)
}

/// The stub and the table entry (module-level items).
///
/// The stub is a naked function (so callers reach it with an ordinary direct call, exactly like
/// any function of its crate) whose body is an aligned 5-byte `jmp rel32` to the implementation,
/// spelled as bytes so that the assembler cannot shorten it, plus an exported alias label
/// `__evolve_stub_{id}` by which patches find it. Stubs share the section `.text.evolve_stubs`,
/// padded to 8 bytes each, so they lie together on few pages and each inside one aligned word
/// (the engine retargets them with one atomic store). Stub and implementation use the
/// `C-unwind` ABI (naked functions cannot use the Rust ABI on stable); both are compiled by rustc
/// from the same signature, so they agree, and panics unwind through them.
fn module_items(p: &Prepared, implementation: TokenStream2) -> TokenStream2 {
    let lifetimes = &p.lifetimes;
    let stub = format_ident!("__evolve_stub_{}", p.id);
    let stub_name = stub.to_string();
    let entry = format_ident!("__EVOLVE_HOT_ENTRY_{}", p.id.to_uppercase());
    let (param_types, output) = (&p.param_types, &p.output);
    let (id, fingerprint, display) = (&p.id, p.fingerprint, &p.display);
    let canary = canary::routing_items(p, &implementation);
    quote! {
        #canary

        #[doc(hidden)]
        #[unsafe(naked)]
        #[allow(improper_ctypes_definitions, unsafe_code)]
        #[unsafe(link_section = ".text.evolve_stubs")]
        extern "C-unwind" fn #stub <#(#lifetimes),*> (#(_: #param_types),*) #output {
            ::core::arch::naked_asm!(
                ".balign 8, 0xcc",
                concat!(".globl ", #stub_name),
                concat!(".type ", #stub_name, ",@function"),
                concat!(#stub_name, ":"),
                ".byte 0xe9",
                ".long {implementation} - . - 4",
                concat!(".size ", #stub_name, ", 5"),
                ".balign 8, 0xcc",
                implementation = sym #implementation,
            )
        }

        #[allow(unsafe_code)]
        #[::evolve::hot::__private::linkme::distributed_slice(::evolve::hot::__private::STUBS)]
        #[linkme(crate = ::evolve::hot::__private::linkme)]
        #[doc(hidden)]
        static #entry: ::evolve::hot::__private::StubEntry =
            // SAFETY: generated by #[evolve::hot]: the stub jumps to the implementation, both
            // with the signature whose fingerprint is given, and the implementation's exported
            // name follows the `__evolve_impl_{id}_{fingerprint}` convention.
            unsafe {
                ::evolve::hot::__private::StubEntry::new(
                    concat!(module_path!(), "::", #display),
                    #id,
                    #fingerprint,
                    || #stub as *const () as usize,
                    || #implementation as *const () as usize,
                )
            };
    }
}

fn impl_attrs(p: &Prepared) -> TokenStream2 {
    let export = format!("__evolve_impl_{}_{:016x}", p.id, p.fingerprint);
    quote! {
        #[doc(hidden)]
        #[allow(unsafe_code, improper_ctypes_definitions)]
        #[unsafe(export_name = #export)]
        #[inline(never)]
    }
}

fn hot_fn(mut f: ItemFn, send: bool) -> syn::Result<TokenStream2> {
    if f.sig.asyncness.is_some() && f.sig.receiver().is_none() {
        async_fn::desugar(&mut f.sig, &mut f.block, send);
    }
    if let Some(receiver) = f.sig.receiver() {
        return Err(syn::Error::new_spanned(
            receiver,
            "#[evolve::hot] on a single method: put #[evolve::hot] on its impl block instead \
             (the attribute on a method cannot see the type it belongs to); every method the \
             block's attribute can prepare becomes hot",
        ));
    }
    let p = prepare(&f.sig, None, &[])?;
    let (params, args) = forwarding(&f.sig);
    let stub = format_ident!("__evolve_stub_{}", p.id);
    let implementation = format_ident!("__evolve_impl_{}", f.sig.ident);
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = f;
    let mut impl_sig = sig.clone();
    impl_sig.ident = implementation.clone();
    impl_sig.abi = Some(syn::parse_quote!(extern "C-unwind"));
    let (name, generics, output) = (&sig.ident, &sig.generics, &sig.output);
    let impl_attrs = impl_attrs(&p);
    let module = module_items(&p, quote!(#implementation));
    Ok(quote! {
        #(#attrs)*
        #[inline(always)]
        #vis fn #name #generics (#(#params),*) #output {
            #stub(#(#args),*)
        }

        #impl_attrs
        #vis #impl_sig #block

        #module
    })
}

fn hot_impl(mut block: ItemImpl, send: bool) -> syn::Result<TokenStream2> {
    if let Some((_, path, _)) = &block.trait_ {
        return Err(syn::Error::new_spanned(
            path,
            "#[evolve::hot] cannot prepare a trait impl: put it on an inherent impl with the \
             methods the trait impl calls",
        ));
    }
    if let Some(param) = block
        .generics
        .params
        .iter()
        .find(|p| !matches!(p, syn::GenericParam::Lifetime(_)))
    {
        return Err(syn::Error::new_spanned(
            param,
            "#[evolve::hot] cannot prepare methods of a generic type: make hot methods on a \
             concrete type",
        ));
    }
    let impl_lifetimes: Vec<syn::LifetimeParam> = block.generics.lifetimes().cloned().collect();
    let self_ty = (*block.self_ty).clone();
    // The module-level table entry names the implementation with the impl's lifetimes left to
    // inference: they are not declared there.
    let mut self_ty_elided = self_ty.clone();
    ElideLifetimes.visit_type_mut(&mut self_ty_elided);
    let mut module = TokenStream2::new();
    let mut items = Vec::new();
    for item in block.items.drain(..) {
        let ImplItem::Fn(mut method) = item else {
            items.push(item);
            continue;
        };
        if method.sig.asyncness.is_some() {
            async_fn::desugar(&mut method.sig, &mut method.block, send);
        }
        // A method that cannot be prepared (generic, async, const, ...) stays an ordinary
        // method: the others of the block are still prepared, and nothing else breaks.
        let Ok(p) = prepare(&method.sig, Some(&self_ty), &impl_lifetimes) else {
            items.push(ImplItem::Fn(method));
            continue;
        };
        let (params, args) = forwarding(&method.sig);
        let stub = format_ident!("__evolve_stub_{}", p.id);
        let implementation = format_ident!("__evolve_impl_{}", method.sig.ident);
        let ImplItemFn {
            attrs,
            vis,
            sig,
            block: body,
            ..
        } = method;
        let mut impl_sig = sig.clone();
        impl_sig.ident = implementation.clone();
        impl_sig.abi = Some(syn::parse_quote!(extern "C-unwind"));
        let (name, generics, output) = (&sig.ident, &sig.generics, &sig.output);
        let impl_attrs = impl_attrs(&p);
        items.push(syn::parse_quote! {
            #(#attrs)*
            #[inline(always)]
            #vis fn #name #generics (#(#params),*) #output {
                #stub(#(#args),*)
            }
        });
        items.push(syn::parse_quote! {
            #impl_attrs
            #vis #impl_sig #body
        });
        module.extend(module_items(&p, quote!(<#self_ty_elided>::#implementation)));
    }
    block.items = items;
    Ok(quote! {
        #block
        #module
    })
}

/// Misuse of `#[evolve::hot]` is an error that says what to do, not a raw compiler error about
/// generated code: the attribute on a single method (it once gave "associated static items are
/// not allowed"), the forms it refuses (const and generic functions, trait impls) and arguments
/// other than `local`. Each error is checked with the tokens it points at: rustc shows the
/// message under them.
#[cfg(test)]
mod tests {
    use super::hot_tokens;
    use proc_macro2::TokenStream as TokenStream2;

    /// The error `#[evolve::hot(attr)]` reports on `item`: its message, and the tokens its span
    /// covers (as the compile error's tokens carry them).
    fn refusal(attr: &str, item: &str) -> String {
        let parse = |text: &str| text.parse::<TokenStream2>().expect("valid tokens");
        match hot_tokens(parse(attr), parse(item)) {
            Ok(expanded) => panic!("expanded instead of refusing: {expanded}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_argument_other_than_local_is_refused() {
        let message = refusal(
            "fast",
            "pub fn price(quantity: u64) -> u64 { quantity * 10 }",
        );
        assert_eq!(
            message,
            "#[evolve::hot] takes no arguments, or `local` (async functions whose futures are \
             not Send)"
        );
    }

    #[test]
    fn a_single_method_is_told_to_use_its_impl_block() {
        let message = refusal(
            "",
            "pub fn bump(&mut self, by: u64) -> u64 { self.total += by; self.total }",
        );
        assert!(
            message.starts_with(
                "#[evolve::hot] on a single method: put #[evolve::hot] on its impl block instead"
            ),
            "{message}"
        );
    }

    #[test]
    fn const_generic_and_trait_impl_forms_are_refused_with_what_to_do() {
        let cases = [
            (
                "pub const fn limit() -> u64 { 1 }",
                "#[evolve::hot] cannot prepare a const fn: it may be evaluated at compile time",
            ),
            (
                "pub fn largest<T: Ord + Copy>(items: &[T]) -> Option<T> { items.iter().copied().max() }",
                "#[evolve::hot] cannot prepare a generic function (every instantiation is \
                 separate code): make a hot non-generic function for each type you need, or a \
                 hot function taking `&dyn Trait`",
            ),
            (
                "impl Clone for Meter { fn clone(&self) -> Meter { Meter } }",
                "#[evolve::hot] cannot prepare a trait impl: put it on an inherent impl with the \
                 methods the trait impl calls",
            ),
        ];
        for (item, expected) in cases {
            assert_eq!(refusal("", item), expected, "{item}");
        }
    }

    /// Where in `item` (one line) the first token spelled `token` starts, and where the error
    /// of `#[evolve::hot]` on `item` starts: rustc underlines from there.
    fn error_and_token_columns(item: &str, token: &str) -> (usize, usize) {
        fn find(stream: TokenStream2, token: &str) -> Option<proc_macro2::Span> {
            stream.into_iter().find_map(|tree| match tree {
                proc_macro2::TokenTree::Group(g) => find(g.stream(), token),
                other if other.to_string() == token => Some(other.span()),
                _ => None,
            })
        }
        let parse = |text: &str| text.parse::<TokenStream2>().expect("valid tokens");
        let error = hot_tokens(TokenStream2::new(), parse(item)).unwrap_err();
        let expected = find(parse(item), token).unwrap_or_else(|| panic!("{token} in {item}"));
        (error.span().start().column, expected.start().column)
    }

    #[test]
    fn the_errors_point_at_the_offending_tokens() {
        for (item, token) in [
            ("pub const fn limit() -> u64 { 1 }", "const"),
            ("pub fn largest<T: Ord>(items: &[T]) -> T { items[0] }", "T"),
            (
                "impl Clone for Meter { fn clone(&self) -> Meter { Meter } }",
                "Clone",
            ),
            ("pub fn bump(&mut self) -> u64 { self.total }", "&"),
        ] {
            let (error, expected) = error_and_token_columns(item, token);
            assert_eq!(error, expected, "the error on `{item}` starts at `{token}`");
        }
    }
}
