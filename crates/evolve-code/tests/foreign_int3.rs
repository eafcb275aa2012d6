//! An `int3` at a patch site that the engine did not write (a debugger's breakpoint, the
//! program's own) reaches the program's `SIGTRAP` handler. Before the write epoch, the engine's
//! handler found the site in its table, saw no armed slot, and waited for a writer that would
//! never come: the thread spun in the handler forever. One test in its own binary: signal
//! dispositions are process-wide.
#![allow(unsafe_code)]

mod common;

use common::{one, two, F};
use evolve_code::{Batch, PatchSite, SiteInsn, WritePath};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

// A jump site in the test's own `.text`, a function returning `one()`.
std::arch::global_asm!(
    ".pushsection .text.evolve_test_foreign_int3,\"ax\",@progbits",
    ".p2align 4",
    ".globl evolve_test_foreign_int3_site",
    "evolve_test_foreign_int3_site:",
    ".byte 0xe9",
    ".long {one} - . - 4",
    ".byte 0xcc, 0xcc, 0xcc",
    ".popsection",
    one = sym one,
);

// SAFETY: a complete function (above) returning what `one` returns.
unsafe extern "C" {
    safe fn evolve_test_foreign_int3_site() -> u64;
}

static PROGRAM_HANDLER_HITS: AtomicU64 = AtomicU64::new(0);
static SITE: AtomicUsize = AtomicUsize::new(0);

/// The program's handler, as a debugger-like tool would write it: a trap at the site's first
/// byte resumes at the jump's target.
extern "C" fn program_handler(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
    PROGRAM_HANDLER_HITS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let gregs = unsafe { &mut (*(context as *mut libc::ucontext_t)).uc_mcontext.gregs };
    if gregs[libc::REG_RIP as usize] as usize - 1 == SITE.load(Ordering::SeqCst) {
        gregs[libc::REG_RIP as usize] = one as F as usize as i64;
    }
}

/// Writes one code byte as a debugger does, through `/proc/self/mem`.
fn poke(address: usize, byte: u8) {
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .unwrap();
    mem.write_all_at(&[byte], address as u64).unwrap();
}

#[test]
fn an_int3_at_a_site_with_no_write_in_flight_reaches_the_programs_handler_instead_of_spinning() {
    let address = evolve_test_foreign_int3_site as *const () as usize;
    SITE.store(address, Ordering::SeqCst);
    // SAFETY: a zeroed sigaction filled with a valid SA_SIGINFO handler.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = program_handler as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGTRAP, &action, std::ptr::null_mut()),
            0
        );
    }
    // SAFETY: the jump site is the test's own; every target is a function of type F.
    let site = unsafe { PatchSite::register(address) }.unwrap();
    // Through the int3 protocol, there and back: the site is in the handler's table, and the
    // engine's handler is in front of the program's.
    for (from, to) in [(one as F, two as F), (two, one)] {
        let mut batch = Batch::new();
        // SAFETY: both targets are functions of type F.
        unsafe {
            batch.path(WritePath::Int3).retarget(
                site,
                SiteInsn::Jmp(from as usize),
                SiteInsn::Jmp(to as usize),
            )
        };
        assert_eq!(batch.apply().unwrap().via_int3, 1);
    }
    let foreign_before = evolve_code::write::trap_counts().foreign;

    // A breakpoint on the site, with no write in flight.
    poke(address, 0xcc);
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(evolve_test_foreign_int3_site()).unwrap());
    let answer = result.recv_timeout(Duration::from_secs(30));
    poke(address, 0xe9);
    assert_eq!(
        answer,
        Ok(1),
        "the call never returned: the engine's handler kept the foreign trap"
    );
    assert_eq!(PROGRAM_HANDLER_HITS.load(Ordering::SeqCst), 1);
    assert_eq!(
        evolve_code::write::trap_counts().foreign,
        foreign_before + 1
    );
    assert_eq!(evolve_test_foreign_int3_site(), 1);
}
