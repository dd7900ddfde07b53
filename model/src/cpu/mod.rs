//! The CPU runtime of the `flex` backend, private to this crate: the flex kernels of [`fused`]'s
//! operations ([`flex`], attention included), the bf16 products on Intel AMX tiles ([`amx`]), the
//! few-row (decoding) products ([`skinny`]), the weights packed once for a generation
//! ([`kept`]), the allocator that keeps large blocks ([`alloc`], declared by the binaries through
//! [`crate::runtime`]) and the compute thread pool ([`pool`]).
//!
//! The stages never name any of it: they see [`crate::device`] (where to compute, and the pool's
//! `hot` / `join` / `in_pool`, which are plain calls on other backends), [`crate::runtime`] and the
//! `matmul` precision. Only [`simd`], the vectorised loops the host-side sampler shares with the
//! kernels, is compiled on every backend.
//!
//! [`fused`]: crate::fused

#[cfg(feature = "flex")]
pub(crate) mod alloc;
#[cfg(feature = "flex")]
pub(crate) mod amx;
#[cfg(feature = "flex")]
pub(crate) mod flex;
#[cfg(feature = "flex")]
pub(crate) mod kept;
#[cfg(feature = "flex")]
pub(crate) mod pool;
pub(crate) mod simd;
#[cfg(feature = "flex")]
pub(crate) mod skinny;
