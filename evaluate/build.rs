//! The LibTorch rpath for `tch` builds; shared by every crate with binaries.
include!("../build/torch_rpath.rs");
