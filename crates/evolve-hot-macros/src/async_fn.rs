//! `#[evolve::hot]` on an `async fn`: the function becomes an ordinary hot function that returns
//! its future boxed.
//!
//! ```text
//! async fn handle(&self, request: &Request) -> Response { BODY }
//! ```
//! becomes
//! ```text
//! fn handle<'evolve_future, 'evolve_life0: 'evolve_future, 'evolve_life1: 'evolve_future>(
//!     &'evolve_life0 self,
//!     request: &'evolve_life1 Request,
//! ) -> Pin<Box<dyn Future<Output = Response> + Send + 'evolve_future>> {
//!     Box::pin(async move { BODY })
//! }
//! ```
//! and then goes through the stub like any hot function. A call made after an update reaches the
//! new version and gets a future of the new version; a future created before keeps the poll
//! function of its own version in its box (its vtable), so it finishes on the code it started
//! with, whatever its state layout — which is why an unprepared `async fn` cannot be changed in
//! place, and a prepared one can. The price is one allocation per call.
//!
//! The future is `Send` (what multi-threaded runtimes require); `#[evolve::hot(local)]` drops the
//! bound for futures that hold `!Send` values across an `.await`.

use proc_macro2::Span;
use quote::quote;
use syn::visit_mut::VisitMut;
use syn::{FnArg, GenericParam, Lifetime, LifetimeParam, ReturnType, Signature, Type};

/// The lifetime every input outlives and the boxed future lives for.
const FUTURE_LIFETIME: &str = "'evolve_future";

/// Gives every elided lifetime of the inputs a name (`'evolve_lifeN`), declared on the function.
struct NameElided {
    named: Vec<Lifetime>,
}

impl NameElided {
    fn fresh(&mut self, span: Span) -> Lifetime {
        let lifetime = Lifetime::new(&format!("'evolve_life{}", self.named.len()), span);
        self.named.push(lifetime.clone());
        lifetime
    }
}

impl VisitMut for NameElided {
    fn visit_type_reference_mut(&mut self, reference: &mut syn::TypeReference) {
        if reference.lifetime.is_none() {
            reference.lifetime = Some(self.fresh(reference.and_token.span));
        }
        syn::visit_mut::visit_type_reference_mut(self, reference);
    }

    fn visit_lifetime_mut(&mut self, lifetime: &mut Lifetime) {
        if lifetime.ident == "_" {
            *lifetime = self.fresh(lifetime.span());
        }
    }

    // `impl Trait` and `fn` types have lifetimes of their own; the signature check refuses the
    // former, and elision inside the latter is bound there.
    fn visit_type_bare_fn_mut(&mut self, _: &mut syn::TypeBareFn) {}
}

/// Rewrites an `async fn`'s signature and body as described in the module docs. `send` is
/// false for `#[evolve::hot(local)]`.
pub(crate) fn desugar(sig: &mut Signature, block: &mut syn::Block, send: bool) {
    sig.asyncness = None;
    let mut names = NameElided { named: Vec::new() };
    for input in sig.inputs.iter_mut() {
        match input {
            FnArg::Receiver(receiver) => {
                if let Some((and, lifetime)) = &mut receiver.reference {
                    if lifetime.is_none() {
                        let fresh = names.fresh(and.span);
                        *lifetime = Some(fresh.clone());
                        if let Type::Reference(r) = &mut *receiver.ty {
                            r.lifetime = Some(fresh);
                        }
                    }
                } else {
                    names.visit_type_mut(&mut receiver.ty);
                }
            }
            FnArg::Typed(typed) => names.visit_type_mut(&mut typed.ty),
        }
    }
    let future = Lifetime::new(FUTURE_LIFETIME, Span::call_site());
    // Every lifetime of the signature, declared or new, outlives the future.
    let declared: Vec<Lifetime> = sig
        .generics
        .lifetimes()
        .map(|l| l.lifetime.clone())
        .collect();
    for param in sig.generics.params.iter_mut() {
        if let GenericParam::Lifetime(l) = param {
            l.bounds.push(future.clone());
        }
    }
    let mut params: Vec<GenericParam> =
        vec![GenericParam::Lifetime(LifetimeParam::new(future.clone()))];
    for lifetime in names.named.iter().filter(|l| !declared.contains(l)) {
        let mut param = LifetimeParam::new(lifetime.clone());
        param.bounds.push(future.clone());
        params.push(GenericParam::Lifetime(param));
    }
    params.extend(std::mem::take(&mut sig.generics.params));
    sig.generics.params = params.into_iter().collect();
    if sig.generics.lt_token.is_none() {
        sig.generics.lt_token = Some(Default::default());
        sig.generics.gt_token = Some(Default::default());
    }

    let output = match &sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, ty) => quote!(#ty),
    };
    let send = send.then(|| quote!(+ ::core::marker::Send));
    sig.output = syn::parse_quote! {
        -> ::core::pin::Pin<::std::boxed::Box<
            dyn ::core::future::Future<Output = #output> #send + #future
        >>
    };
    // Every parameter moves into the future, as an `async fn`'s do (one the body does not use
    // would otherwise be dropped when the call returns, before the future runs).
    let moves = sig.inputs.iter().filter_map(|input| match input {
        FnArg::Typed(typed) => match &*typed.pat {
            syn::Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => {
                let (ident, mutability) = (&p.ident, &p.mutability);
                Some(
                    quote!(#[allow(unused_mut, unused_variables)] let #mutability #ident = #ident;),
                )
            }
            _ => None,
        },
        FnArg::Receiver(_) => None,
    });
    let moves: Vec<_> = moves.collect();
    let body = &*block;
    *block = syn::parse_quote! {{
        ::std::boxed::Box::pin(async move {
            #(#moves)*
            let __evolve_output: #output = #body;
            #[allow(unreachable_code)]
            __evolve_output
        })
    }};
}
