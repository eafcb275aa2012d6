//! Loading a patch object runs none of its code before it is verified: each hole a shared
//! object could use to run code at `dlopen` is refused, judged from what the dynamic loader
//! reads (program headers and `PT_DYNAMIC`), and the bytes loaded are the bytes checked.
//!
//! The objects are compiled here with `cc`. Each one that would run code writes a marker file
//! when it does, so a test sees not only the refusal but that nothing ran.

use evolve_code::dylib::{PatchFile, PatchObject};
use evolve_code::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("evolve-loading-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// C source of a function `__evolve_impl_f_0000000000000001` (what a patch exports) plus
/// `extra`; `MARKER` is defined as the path of the marker file, and `mark()` creates it.
fn source(dir: &Path, extra: &str) -> String {
    format!(
        "#include <fcntl.h>\n#include <string.h>\n#include <unistd.h>\n\
         #define MARKER \"{}\"\n\
         static void mark(void) {{ int fd = open(MARKER, O_CREAT | O_WRONLY, 0600); \
         if (fd >= 0) close(fd); }}\n\
         int __evolve_impl_f_0000000000000001(int x) {{ return x * 3; }}\n{extra}\n",
        marker(dir).display()
    )
}

fn marker(dir: &Path) -> PathBuf {
    dir.join("ran")
}

/// Compiles `source` into `dir/name` as a patch is linked (`-shared -nostartfiles`), with
/// `flags` added.
fn shared_object(dir: &Path, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).unwrap();
    let out = dir.join(name);
    let status = Command::new("cc")
        .args(["-shared", "-nostartfiles", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&c)
        .args(flags)
        .status()
        .expect("cc runs");
    assert!(status.success(), "cc failed for {name}");
    out
}

/// Expects `PatchObject::open(path)` to refuse with an `UnsafeObject` error containing `cause`,
/// and the object's code not to have run.
fn refused_as_unsafe(dir: &Path, path: &Path, cause: &str) {
    let err = PatchObject::open(path).expect_err("loading must be refused");
    assert!(
        matches!(err.kind(), ErrorKind::UnsafeObject { .. }),
        "{err} is not an UnsafeObject refusal"
    );
    assert!(
        err.to_string().contains(cause),
        "{err:?} does not name {cause:?}"
    );
    assert!(!marker(dir).exists(), "the object's code ran");
}

/// The ELF header's section header fields zeroed: the loader does not need them, and a check
/// that reads them sees no dynamic section at all.
fn without_section_headers(path: &Path) -> PathBuf {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0x28..0x30].fill(0); // e_shoff
    bytes[0x3c..0x40].fill(0); // e_shnum, e_shstrndx
    let out = path.with_extension("noshdr");
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn an_initializer_hidden_from_the_section_headers_is_refused() {
    let dir = scratch("init-noshdr");
    let so = shared_object(
        &dir,
        "ctor.so",
        &source(
            &dir,
            "__attribute__((constructor)) static void init(void) { mark(); }",
        ),
        &[],
    );
    refused_as_unsafe(&dir, &so, "DT_INIT_ARRAY");
    refused_as_unsafe(&dir, &without_section_headers(&so), "DT_INIT_ARRAY");
}

#[test]
fn dt_init_is_refused() {
    let dir = scratch("dt-init");
    let so = shared_object(
        &dir,
        "init.so",
        &source(&dir, "void start(void) { mark(); }"),
        &["-Wl,-init,start"],
    );
    refused_as_unsafe(&dir, &without_section_headers(&so), "DT_INIT");
}

#[test]
fn a_finalizer_is_refused() {
    let dir = scratch("fini");
    let so = shared_object(
        &dir,
        "dtor.so",
        &source(
            &dir,
            "__attribute__((destructor)) static void fini(void) { mark(); }",
        ),
        &[],
    );
    refused_as_unsafe(&dir, &so, "DT_FINI_ARRAY");
}

const IFUNC: &str = "static int impl(void) { return 7; }\n\
    static void *resolve(void) { mark(); return (void *)impl; }\n\
    int seven(void) __attribute__((ifunc(\"resolve\")));\n\
    int call_seven(void) { return seven(); }";

#[test]
fn an_exported_ifunc_of_the_patch_is_refused() {
    let dir = scratch("ifunc");
    let so = shared_object(&dir, "ifunc.so", &source(&dir, IFUNC), &[]);
    refused_as_unsafe(&dir, &without_section_headers(&so), "IFUNC");
}

#[test]
fn an_irelative_relocation_is_refused() {
    let dir = scratch("irelative");
    // Bound inside the object: the loader resolves it with an R_X86_64_IRELATIVE relocation.
    let so = shared_object(
        &dir,
        "irelative.so",
        &source(
            &dir,
            &IFUNC.replace("int seven(void)", "static int seven(void)"),
        ),
        &[],
    );
    refused_as_unsafe(&dir, &without_section_headers(&so), "IFUNC");
}

#[test]
fn references_to_the_c_library_ifuncs_are_loaded() {
    let dir = scratch("libc-ifunc");
    // memmove, memcpy and strlen are IFUNCs of the C library: their resolvers already ran for
    // the program, so binding to them runs nothing of the object's.
    let so = shared_object(
        &dir,
        "libc.so",
        &source(
            &dir,
            "size_t copy(char *d, const char *s, size_t n) { memmove(d, s, n); \
             memcpy(d, s, n); return strlen(d); }",
        ),
        &[],
    );
    let object = PatchObject::open(&so).expect("loads");
    assert!(object.implementation("f", 1).is_ok());
    assert!(!marker(&dir).exists());
}

#[test]
fn a_library_the_program_has_not_loaded_is_refused() {
    let dir = scratch("needed");
    let dep = shared_object(
        &dir,
        "libevolveloadingdep.so",
        &source(
            &dir,
            "__attribute__((constructor)) static void init(void) { mark(); }\n\
             int dep_value(void) { return 5; }",
        ),
        &["-Wl,-soname,libevolveloadingdep.so"],
    );
    let so = shared_object(
        &dir,
        "needs.so",
        &source(
            &dir,
            "int dep_value(void);\nint use_dep(void) { return dep_value(); }",
        ),
        &[
            dep.to_str().unwrap(),
            &format!("-Wl,-rpath,{}", dir.display()),
        ],
    );
    refused_as_unsafe(
        &dir,
        &without_section_headers(&so),
        "it needs libevolveloadingdep.so, which this program has not loaded",
    );
}

#[test]
fn an_executable_stack_is_refused() {
    let dir = scratch("execstack");
    let so = shared_object(&dir, "stack.so", &source(&dir, ""), &["-Wl,-z,execstack"]);
    refused_as_unsafe(&dir, &so, "executable stack");
}

#[test]
fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let dir = scratch("fifo");
    let fifo = dir.join("patch.so");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .unwrap();
    let (send, receive) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || send.send(PatchObject::open(&path).map(|_| ())));
    let result = match receive.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(result) => result,
        Err(_) => {
            // Unblock the reader (a writer that closes at once) before failing.
            drop(std::fs::OpenOptions::new().write(true).open(&fifo));
            panic!("opening a FIFO as a patch blocked waiting for a writer");
        }
    };
    let err = result.unwrap_err();
    assert!(
        err.to_string().contains("it is a FIFO, not a regular file"),
        "{err}"
    );
    for (path, what) in [
        (Path::new("/dev/zero"), "a character device"),
        (dir.as_path(), "a directory"),
    ] {
        let err = PatchObject::open(path).unwrap_err();
        assert!(err.to_string().contains(what), "{err}");
    }
}

#[test]
fn the_bytes_loaded_are_the_bytes_read_not_the_file_at_the_path_later() {
    let dir = scratch("reopen");
    let good = shared_object(&dir, "good.so", &source(&dir, ""), &[]);
    let evil = shared_object(
        &dir,
        "evil.so",
        &source(
            &dir,
            "__attribute__((constructor)) static void init(void) { mark(); }",
        )
        .replace("0000000000000001", "0000000000000002"),
        &[],
    );
    let path = dir.join("patch.so");
    std::fs::copy(&good, &path).unwrap();
    let file = PatchFile::read(&path).unwrap();
    file.check_loadable().unwrap();
    // The path now names another file: what is loaded is still what was read and checked.
    std::fs::rename(&evil, &path).unwrap();
    let object = PatchObject::load(&file).unwrap();
    assert!(object.implementation("f", 1).is_ok());
    assert!(object.implementation("f", 2).is_err());
    assert!(!marker(&dir).exists(), "the file at the path was loaded");
}
