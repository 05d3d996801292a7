//! A tiny PVH guest for the Cloud Hypervisor API tests: no kernel build,
//! and it runs anywhere KVM does (on a PVM host, `kvm-pvm`, a stock Linux
//! guest dies within two seconds with a KVM internal error and CH exits;
//! this guest halts at once).

use std::path::Path;

/// Writes a minimal x86-64 ELF "kernel" with a PVH entry note at `path`:
/// one page at 1 MiB whose code writes `serial` to COM1 (port 0x3f8, the
/// serial console CH emulates), then `hlt; jmp .-1`. Enough for CH to
/// load and boot it, and, with a `serial` that holds the agent's serving
/// line, to stand in for a template's guest.
pub fn write_pvh_kernel(path: &Path, serial: &[u8]) {
    const LOAD: u64 = 0x10_0000;
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    for word in [4u32, 4, 18] {
        // namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
        note.extend_from_slice(&word.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD as u32).to_le_bytes());
    let code_off = note_off + note.len();
    // PVH enters in 32-bit protected mode.
    let mut code = Vec::new();
    if !serial.is_empty() {
        code.extend_from_slice(&[0xba, 0xf8, 0x03, 0x00, 0x00]); // mov edx, 0x3f8
        for byte in serial {
            code.extend_from_slice(&[0xb0, *byte, 0xee]); // mov al, byte; out dx, al
        }
    }
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp .-1

    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHDR as u16, PHDR as u16, 2, 0, 0, 0] {
        // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    let mut phdr = |kind: u32, flags: u32, offset: usize, addr: u64, size: usize, align: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        for value in [offset as u64, addr, addr, size as u64, size as u64, align] {
            elf.extend_from_slice(&value.to_le_bytes());
        }
    };
    phdr(1, 5, code_off, LOAD, code.len(), 0x1000); // PT_LOAD, R+X
    phdr(4, 4, note_off, 0, note.len(), 4); // PT_NOTE
    elf.extend_from_slice(&note);
    elf.extend_from_slice(&code);
    std::fs::write(path, elf).expect("write the test kernel");
}
