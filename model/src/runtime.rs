//! The entry of every binary of the pipeline, in one place: the global allocator it declares
//! ([`global_allocator!`](crate::global_allocator)), the signal settings it starts with
//! ([`start`]), and how it ends on an error ([`exit_on_error`]).
//!
//! It is not for libraries: a library never sets signals, exits, or picks the allocator.
//!
//! ```
//! model::global_allocator!();
//!
//! fn main() {
//!     model::runtime::start();
//!     let steps = model::runtime::exit_on_error(anyhow::Ok(3));
//!     println!("done: {steps} steps");
//! }
//! ```

/// The allocator the binaries declare: on the CPU backend, the system allocator keeping freed
/// blocks of 16 MiB and more for reuse (`cpu::alloc`); elsewhere the system allocator.
#[cfg(feature = "flex")]
pub type Allocator = crate::cpu::alloc::KeepLarge;
/// The allocator the binaries declare: on the CPU backend, the system allocator keeping freed
/// blocks of 16 MiB and more for reuse; elsewhere the system allocator.
#[cfg(not(feature = "flex"))]
pub type Allocator = std::alloc::System;

/// Declares [`runtime::Allocator`](crate::runtime::Allocator) the binary's global allocator.
/// Invoke once, at the top level of a binary's main.rs: `model::global_allocator!();`.
#[macro_export]
macro_rules! global_allocator {
    () => {
        /// The pipeline's allocator (see `model::runtime::Allocator`).
        #[global_allocator]
        static ALLOCATOR: $crate::runtime::Allocator = $crate::runtime::Allocator {};
    };
}

/// The process settings every binary starts with, at the start of `main`, before any thread is
/// spawned: a closed output pipe ends the program quietly, and a write past the file-size limit
/// fails with an error instead of killing the process.
pub fn start() {
    exit_quietly_on_broken_pipe();
    file_size_limit_as_error();
}

/// Prints the error chain of a failed command (`error: …: …`) on stderr and exits with status 1;
/// gives the value of a success.
pub fn exit_on_error<T>(result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::exit(1)
    })
}

/// Lets a command-line tool end quietly when its output pipe closes (`model info DIR | head`),
/// as Unix tools do, instead of panicking on a failed print.
fn exit_quietly_on_broken_pipe() {
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE at the start of main, before any
    // thread is spawned, is what C programs get by default.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Makes a write past the file-size limit (`ulimit -f`, RLIMIT_FSIZE) fail as a full disk does,
/// with an error (EFBIG) that the caller reports with the file's path, instead of the SIGXFSZ
/// signal that by default kills the process without a word (and, for a checkpoint, without
/// cleaning up its temporary folder).
fn file_size_limit_as_error() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to ignore at the start of main, before any thread
    // is spawned.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}
