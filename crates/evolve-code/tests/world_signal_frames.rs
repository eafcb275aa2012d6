//! A thread whose innermost frame is a signal handler resumes, when the handler returns, at the
//! PC the signal interrupted (or wherever the handler moved it): an entry detour must not be
//! written while that PC lies inside the bytes it replaces, even though the thread's own RIP is
//! in the handler. One test in its own binary: it installs a `SIGSEGV` handler.
#![allow(unsafe_code)]

use evolve_code::{Counter, Detour, DetourHooks, NearBlock};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The generated function: `nop; mov al, [rdi]; nop; nop; nop; mov eax, 42; ret`. Called with a
/// pointer to an inaccessible page, its second instruction faults.
const CODE: [u8; 12] = [
    0x90, 0x8a, 0x07, 0x90, 0x90, 0x90, 0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3,
];
/// Offset of the faulting load, and of the instruction after it, where the handler resumes.
const FAULT: usize = 1;
const RESUME: usize = 3;

static FUNCTION: AtomicUsize = AtomicUsize::new(0);
static IN_HANDLER: AtomicBool = AtomicBool::new(false);
static GO: AtomicBool = AtomicBool::new(false);
static LEFT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_segv(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let gregs = unsafe { &mut (*(context as *mut libc::ucontext_t)).uc_mcontext.gregs };
    let function = FUNCTION.load(Ordering::SeqCst);
    assert_eq!(gregs[libc::REG_RIP as usize] as usize, function + FAULT);
    // Skip the load: the thread will resume inside the first five bytes.
    gregs[libc::REG_RIP as usize] = (function + RESUME) as i64;
    IN_HANDLER.store(true, Ordering::SeqCst);
    while !GO.load(Ordering::SeqCst) {
        // SAFETY: nanosleep is async-signal-safe.
        unsafe {
            libc::nanosleep(
                &libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 1_000_000,
                },
                std::ptr::null_mut(),
            )
        };
    }
    LEFT.store(true, Ordering::SeqCst);
}

fn hooks() -> DetourHooks {
    DetourHooks {
        counter: Arc::new(Counter::new()),
        slow: Arc::new(AtomicBool::new(false)),
        on_entry: Arc::new(|_| {}),
    }
}

#[test]
fn a_thread_interrupted_inside_the_replaced_bytes_by_a_running_handler_delays_the_detour() {
    let block = NearBlock::alloc(on_segv as *const () as usize, 64).unwrap();
    // SAFETY: a fresh block nobody executes yet.
    unsafe { block.write(0, &CODE).unwrap() };
    let function = block.address();
    FUNCTION.store(function, Ordering::SeqCst);
    // SAFETY: an inaccessible page of our own, never unmapped while the test runs.
    let bad = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as usize;
    // SAFETY: a zeroed sigaction with an SA_SIGINFO handler of the matching signature.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_segv as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGSEGV, &action, std::ptr::null_mut()),
            0
        );
    }
    let call = std::thread::spawn(move || {
        // SAFETY: the generated code is a complete function of this type.
        let f: extern "C" fn(usize) -> u64 = unsafe { std::mem::transmute(function) };
        f(bad)
    });
    while !IN_HANDLER.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The caller's RIP is in the handler; the PC it resumes at is `function + 3`.
    let install = std::thread::spawn(move || {
        // SAFETY: `CODE` is one whole function of mapped code, `CODE.len()` bytes at `function`.
        let result = unsafe { Detour::install(function, CODE.len(), hooks()) };
        (result, LEFT.load(Ordering::SeqCst))
    });
    // Give a wrong implementation every chance to write the jump now.
    std::thread::sleep(Duration::from_millis(300));
    if install.is_finished() {
        // Allowed only as a refusal: the thread kept the bytes busy. (Checked before the
        // handler returns: after a wrong write, the thread would resume inside the jump.)
        let (result, _) = install.join().unwrap();
        let error = result.as_ref().err().map(|e| e.to_string());
        assert!(
            result.is_err(),
            "the detour was written while a thread could resume inside it"
        );
        assert!(error.as_deref().unwrap().contains("inside"), "{error:?}");
        GO.store(true, Ordering::SeqCst);
    } else {
        GO.store(true, Ordering::SeqCst);
        let (result, handler_had_left) = install.join().unwrap();
        if let Ok(d) = result {
            assert!(handler_had_left, "written before the handler returned");
            d.remove().unwrap();
        }
    }
    assert_eq!(call.join().unwrap(), 42);
    // Once nothing can resume inside, the detour goes in and counts calls.
    let hooks = hooks();
    // SAFETY: as above.
    let d = unsafe { Detour::install(function, CODE.len(), hooks.clone()) }.unwrap();
    // SAFETY: as above; the detour keeps the function's behaviour.
    let f: extern "C" fn(usize) -> u64 = unsafe { std::mem::transmute(function) };
    let ok = Box::new(7u8);
    assert_eq!(f(&*ok as *const u8 as usize), 42);
    assert_eq!(hooks.counter.get(), 1);
    d.remove().unwrap();
}
