//! What a freestanding program must supply itself: the memory functions the
//! compiler calls (no libc here), the panic handler, console formatting.

use core::fmt::{self, Write};

// The memory functions in assembly so the compiler cannot turn their loops
// back into calls to themselves. `rep movsb`/`stosb` are fast in ring 3.
core::arch::global_asm!(
    r#"
    .section .text.memfuncs, "ax"
    .global memcpy
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret

    .global memset
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret

    .global memmove
memmove:
    mov rax, rdi
    mov rcx, rdx
    cmp rdi, rsi
    jbe 1f
    lea rsi, [rsi + rdx - 1]
    lea rdi, [rdi + rdx - 1]
    std
    rep movsb
    cld
    ret
1:
    rep movsb
    ret

    .global memcmp
    .global bcmp
memcmp:
bcmp:
    xor eax, eax
    test rdx, rdx
    jz 3f
2:
    movzx eax, byte ptr [rdi]
    movzx ecx, byte ptr [rsi]
    sub eax, ecx
    jnz 3f
    inc rdi
    inc rsi
    dec rdx
    jnz 2b
3:
    ret
    .section .text
    "#
);

/// Console output through the TX ring.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        crate::serial::write(s.as_bytes());
        Ok(())
    }
}

/// Prints a line to the console (format arguments, newline added).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let mut line = $crate::runtime::LineBuffer::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        line.finish();
    }};
}

/// Builds one line before handing it to the TX ring in a single piece, so
/// lines are never interleaved.
pub struct LineBuffer {
    bytes: [u8; 512],
    len: usize,
}

impl LineBuffer {
    pub const fn new() -> Self {
        LineBuffer {
            bytes: [0; 512],
            len: 0,
        }
    }

    pub fn finish(mut self) {
        if self.len >= self.bytes.len() {
            self.len = self.bytes.len() - 1;
        }
        self.bytes[self.len] = b'\n';
        crate::serial::write(&self.bytes[..self.len + 1]);
    }

    /// The line so far (no newline added).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len.min(self.bytes.len())]
    }
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for LineBuffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.bytes.len() - 1 - self.len.min(self.bytes.len() - 1);
        let n = s.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut console = Console;
    let _ = write!(console, "\nprobe: panic: {}\n", info.message());
    if let Some(loc) = info.location() {
        let _ = writeln!(console, "probe: panic at {}:{}", loc.file(), loc.line());
    }
    crate::serial::flush();
    loop {
        core::hint::spin_loop();
    }
}
