//! VMDK (in progress).

/// "KDMV": a hosted sparse extent (monolithicSparse, streamOptimized).
pub(crate) const SPARSE_MAGIC: &[u8] = b"KDMV";
/// A text descriptor.
pub(crate) const DESCRIPTOR_MAGIC: &[u8] = b"# Disk DescriptorFile";
