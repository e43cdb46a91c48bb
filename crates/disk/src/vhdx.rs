//! VHDX (in progress).

/// The file type identifier's signature at offset 0.
pub(crate) const FILE_MAGIC: &[u8] = b"vhdxfile";
