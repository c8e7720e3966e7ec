//! The accelerator probe: run a tiny real guest and see whether it executes.
//!
//! `/dev/kvm` existing and opening is not enough: on this project's build machine it is backed
//! by PVM (a nested hypervisor that only runs specially built guest kernels), a stock kernel
//! hangs under `-accel kvm` and `-cpu host` aborts. A probe that only runs real-mode code is
//! fooled too: seven real-mode instructions ran fine under PVM there (exit in 0.1 s). So the
//! probe firmware does what every x86-64 kernel does first: it enters protected mode, builds
//! identity page tables, enables PAE and `EFER.LME`, turns on paging and jumps into a 64-bit code
//! segment; only there does it write `0x2a` to the `isa-debug-exit` port, which makes QEMU exit
//! with status `(0x2a << 1) | 1 = 85`. Measured here: TCG exits 85 in about 0.1 s, the PVM-backed
//! KVM hangs until the timeout, so the node falls back to TCG and says why.
//!
//! The firmware is 181 bytes of code at the start of a 64 KiB ROM plus a far jump at the reset
//! vector (ROM offset 0xFFF0). Source (GNU as; `as --64 p.S && ld -Ttext=0xf0000 && objcopy -O
//! binary -j .text`):
//!
//! ```text
//! .code16
//! .text
//! .globl _start
//! _start:
//! start16:
//!     cli
//!     movw $0xf000, %ax
//!     movw %ax, %ds
//!     lgdtl (gdtr - 0xf0000)
//!     movl %cr0, %eax
//!     orl $1, %eax
//!     movl %eax, %cr0
//!     ljmpl $0x08, $pm32
//! .code32
//! pm32:
//!     movw $0x10, %ax
//!     movw %ax, %ds
//!     movw %ax, %es
//!     movw %ax, %ss
//!     movl $0x1000, %edi
//!     xorl %eax, %eax
//!     movl $0xc00, %ecx
//!     rep stosl
//!     movl $0x2003, 0x1000
//!     movl $0x3003, 0x2000
//!     movl $0x00000083, 0x3000
//!     movl $0x1000, %eax
//!     movl %eax, %cr3
//!     movl %cr4, %eax
//!     orl $0x20, %eax
//!     movl %eax, %cr4
//!     movl $0xC0000080, %ecx
//!     rdmsr
//!     orl $0x100, %eax
//!     wrmsr
//!     movl %cr0, %eax
//!     orl $0x80000000, %eax
//!     movl %eax, %cr0
//!     ljmp $0x18, $lm64
//! .code64
//! lm64:
//!     movb $0x2a, %al
//!     outb %al, $0xf4
//! 1:  hlt
//!     jmp 1b
//! .align 8
//! gdt:
//!     .quad 0
//!     .quad 0x00cf9a000000ffff
//!     .quad 0x00cf92000000ffff
//!     .quad 0x00af9a000000ffff
//! gdtr:
//!     .word gdtr - gdt - 1
//!     .long gdt
//! .org 0xfff0
//! .code16
//! reset:
//!     ljmp $0xf000, $(start16 - 0xf0000)
//! .org 0x10000
//! ```

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::backend::Accel;

/// The exit status QEMU reports after the probe guest ran.
pub const PROBE_EXIT_CODE: i32 = (0x2a << 1) | 1;
const PROBE_ROM_SIZE: usize = 64 * 1024;

/// Code at ROM offset 0 (physical 0xF0000): real mode -> protected mode -> long mode -> `out`.
const PROBE_CODE: [u8; 181] = [
    0xfa, 0xb8, 0x00, 0xf0, 0x8e, 0xd8, 0x66, 0x0f, 0x01, 0x16, 0xb0, 0x00, 0x0f, 0x20, 0xc0, 0x66,
    0x83, 0xc8, 0x01, 0x0f, 0x22, 0xc0, 0x66, 0xea, 0x1e, 0x00, 0x0f, 0x00, 0x08, 0x00, 0x66, 0xb8,
    0x10, 0x00, 0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0, 0xbf, 0x00, 0x10, 0x00, 0x00, 0x31, 0xc0, 0xb9,
    0x00, 0x0c, 0x00, 0x00, 0xf3, 0xab, 0xc7, 0x05, 0x00, 0x10, 0x00, 0x00, 0x03, 0x20, 0x00, 0x00,
    0xc7, 0x05, 0x00, 0x20, 0x00, 0x00, 0x03, 0x30, 0x00, 0x00, 0xc7, 0x05, 0x00, 0x30, 0x00, 0x00,
    0x83, 0x00, 0x00, 0x00, 0xb8, 0x00, 0x10, 0x00, 0x00, 0x0f, 0x22, 0xd8, 0x0f, 0x20, 0xe0, 0x83,
    0xc8, 0x20, 0x0f, 0x22, 0xe0, 0xb9, 0x80, 0x00, 0x00, 0xc0, 0x0f, 0x32, 0x0d, 0x00, 0x01, 0x00,
    0x00, 0x0f, 0x30, 0x0f, 0x20, 0xc0, 0x0d, 0x00, 0x00, 0x00, 0x80, 0x0f, 0x22, 0xc0, 0xea, 0x85,
    0x00, 0x0f, 0x00, 0x18, 0x00, 0xb0, 0x2a, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, 0x8d, 0xb4, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00,
    0xff, 0xff, 0x00, 0x00, 0x00, 0x92, 0xcf, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xaf, 0x00,
    0x1f, 0x00, 0x90, 0x00, 0x0f,
];
/// At the reset vector (ROM offset 0xFFF0): `ljmp $0xf000, $0`.
const RESET_JUMP: [u8; 5] = [0xea, 0x00, 0x00, 0x00, 0xf0];

/// The 64 KiB probe firmware image.
pub fn probe_rom() -> Vec<u8> {
    let mut rom = vec![0u8; PROBE_ROM_SIZE];
    rom[..PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    let at = PROBE_ROM_SIZE - 16;
    rom[at..at + RESET_JUMP.len()].copy_from_slice(&RESET_JUMP);
    rom
}

/// Outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// Whether the guest ran.
    pub ok: bool,
    /// What happened, for logs and metrics.
    pub detail: String,
    /// Wall time of the probe.
    pub elapsed: Duration,
}

/// Runs the probe guest under `accel` with CPU model `cpu_model`, writing the firmware into
/// `work_dir`, and kills QEMU after `timeout`.
pub async fn probe(
    qemu: &Path,
    accel: Accel,
    cpu_model: &str,
    work_dir: &Path,
    timeout: Duration,
) -> ProbeOutcome {
    let started = Instant::now();
    let fail = |detail: String| ProbeOutcome {
        ok: false,
        detail,
        elapsed: started.elapsed(),
    };
    if accel == Accel::Kvm
        && let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
    {
        return fail(format!("/dev/kvm is not usable: {e}"));
    }
    let rom_path = work_dir.join(format!("accel-probe-{}.rom", std::process::id()));
    if let Err(e) = std::fs::write(&rom_path, probe_rom()) {
        return fail(format!("cannot write probe firmware: {e}"));
    }
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-machine",
        "pc",
        "-accel",
        accel.as_str(),
        "-cpu",
        cpu_model,
    ])
    .args(["-m", "16", "-smp", "1", "-nodefaults", "-no-user-config"])
    .args(["-display", "none", "-no-reboot", "-bios"])
    .arg(&rom_path)
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let outcome = match cmd.spawn() {
        Err(e) => fail(format!("cannot run {}: {e}", qemu.display())),
        Ok(mut child) => {
            let mut stderr = child.stderr.take();
            match tokio::time::timeout(timeout, child.wait()).await {
                Err(_) => {
                    let _ = child.kill().await;
                    fail(format!(
                        "probe guest did not run within {} ms under {} (hang)",
                        timeout.as_millis(),
                        accel.as_str()
                    ))
                }
                Ok(Err(e)) => fail(format!("waiting for qemu: {e}")),
                Ok(Ok(status)) => {
                    let mut err = String::new();
                    if let Some(s) = stderr.as_mut() {
                        let mut buf = Vec::new();
                        let _ = s.take(4096).read_to_end(&mut buf).await;
                        err = String::from_utf8_lossy(&buf).trim().to_owned();
                    }
                    if status.code() == Some(PROBE_EXIT_CODE) {
                        ProbeOutcome {
                            ok: true,
                            detail: format!(
                                "probe guest ran under {} in {} ms",
                                accel.as_str(),
                                started.elapsed().as_millis()
                            ),
                            elapsed: started.elapsed(),
                        }
                    } else {
                        let first_line = err.lines().next().unwrap_or("").to_owned();
                        fail(format!(
                            "probe guest under {} ended with {status}: {first_line}",
                            accel.as_str()
                        ))
                    }
                }
            }
        }
    };
    let _ = std::fs::remove_file(&rom_path);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn rom_has_the_reset_vector_code() {
        let rom = probe_rom();
        assert_eq!(rom.len(), 65536);
        assert_eq!(&rom[0xFFF0..0xFFF5], &[0xea, 0x00, 0x00, 0x00, 0xf0]);
        // Byte for byte the image the assembler produced (see the module docs).
        let digest: [u8; 32] = sha2::Sha256::digest(&rom).into();
        assert_eq!(
            hex::encode(digest),
            "6156c6e2ee7b05dcdc1ced3ff6061872668c2bd8b863149a35ff0eec1f5cca45"
        );
    }

    /// The probe really runs code: under TCG it must succeed (this is what makes a KVM failure
    /// meaningful), and a probe against a missing binary must fail.
    #[tokio::test]
    async fn tcg_probe_runs_and_missing_binary_fails() {
        let dir = tempfile::tempdir().unwrap();
        let ok = probe(
            Path::new("qemu-system-x86_64"),
            Accel::Tcg,
            "qemu64",
            dir.path(),
            Duration::from_secs(20),
        )
        .await;
        assert!(ok.ok, "{}", ok.detail);
        let bad = probe(
            Path::new("/nonexistent/qemu"),
            Accel::Tcg,
            "qemu64",
            dir.path(),
            Duration::from_secs(5),
        )
        .await;
        assert!(!bad.ok);
        assert!(bad.detail.contains("cannot run"), "{}", bad.detail);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe left files"
        );
    }
}
