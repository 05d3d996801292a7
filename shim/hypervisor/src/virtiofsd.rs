//! virtiofsd: one sandboxed daemon per VM (filled in by the QEMU work).
