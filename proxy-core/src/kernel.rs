//! Kernel forwarding (Linux): an established plaintext session's two TCP
//! sockets are handed to a BPF sockhash, and the kernel moves every byte
//! from one to the other without waking the proxy or copying it to user
//! space. The programs are assembled here, instruction by instruction: no
//! compiler is needed to build them, and a kernel without the support
//! (no BPF, no stream parser, not root) is found out at start.
//!
//! What each socket runs, in the kernel:
//! - a stream parser that cuts what arrived into chunks. The client's data
//!   is one chunk per arrival (it needs no boundaries). The server's is
//!   followed message by message (1 type byte, a 4-byte length; walked
//!   with `bpf_loop`, so a chunk may hold any number of them), in its
//!   `State`, so that the kernel always knows whether the next byte starts
//!   a message, which message was last, and a ReadyForQuery's transaction
//!   status. The parser stops a stream for good (it returns an error, and
//!   the kernel leaves that chunk and all after it in the socket's receive
//!   queue): the client's once the session is fenced (a flag the proxy
//!   sets in the `ctl` map) or its view's validity deadline has passed
//!   (the `deadlines` map, read against the kernel's monotonic clock, so a
//!   frozen proxy forwards nothing after it); the server's once fenced,
//!   at its next message boundary;
//! - a verdict that redirects every chunk to the peer's send queue.
//!
//! Taking a session back ([`Handed::take_back`]): the proxy sets the flag,
//! waits until the server's stream stopped or rests at a boundary and
//! every redirected byte is in its destination socket's send queue
//! (counted by the kernel and read from TCP_INFO), then takes both sockets
//! out of the sockhash and goes on in user space, reading what waits in
//! the receive queues. So the FATAL of a fenced session follows a whole
//! message, and nothing the client sent after the fence reaches the
//! server. Nothing ever passes to the proxy through the sockhash's own
//! receive path: its accounting left streams stalled when the proxy read
//! them slower than they arrived.
//!
//! Ordering facts this relies on (kernel 5.x-6.x): a socket's parser and
//! verdict run under its socket lock, one chunk at a time, so an ioctl
//! that takes the lock (FIONREAD) is a barrier after which every chunk
//! sees the flag; a redirect is queued to the peer's psock and written by
//! a kernel worker, so "sent" is measured, never assumed; deleting a
//! socket from the sockhash drops what is still queued for it, so the
//! proxy deletes only once that is nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::fence::Fence;
use crate::protocol::MessageTracker;
use crate::view::Deadline;

// bpf(2) commands, map and program types, attach types, helpers.
const MAP_CREATE: i32 = 0;
const MAP_LOOKUP_ELEM: i32 = 1;
const MAP_UPDATE_ELEM: i32 = 2;
const MAP_DELETE_ELEM: i32 = 3;
const PROG_LOAD: i32 = 5;
const PROG_ATTACH: i32 = 8;
const BTF_LOAD: i32 = 18;
const MAP_TYPE_HASH: u32 = 1;
const MAP_TYPE_ARRAY: u32 = 2;
const MAP_TYPE_SOCKHASH: u32 = 18;
const PROG_TYPE_SK_SKB: u32 = 14;
const SK_SKB_STREAM_PARSER: u32 = 4;
const SK_SKB_STREAM_VERDICT: u32 = 5;
const F_NO_PREALLOC: u32 = 1;
const NOEXIST: u64 = 1;
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_KTIME_GET_NS: i32 = 5;
const HELPER_SKB_LOAD_BYTES: i32 = 26;
const HELPER_GET_SOCKET_COOKIE: i32 = 46;
const HELPER_SK_REDIRECT_HASH: i32 = 72;
const HELPER_LOOP: i32 = 181;
const SO_COOKIE: libc::c_int = 57;
const SIOCOUTQ: libc::c_ulong = 0x5411;

/// Sessions the maps hold at once (two sockets each); a session beyond
/// it forwards in user space.
const MAX_SESSIONS: u32 = 1 << 17;
/// Validity deadlines (one per cluster view); slot 0 means none.
const DEADLINE_SLOTS: u32 = 4096;

/// One socket's state in the `state` map, written by the kernel's
/// programs once the socket is in the sockhash (the proxy only reads it).
mod st {
    pub const PEER: i16 = 0; // u64: the other socket's cookie
    pub const REDIR: i16 = 8; // u64: bytes redirected to the peer
    pub const ZREDIR: i16 = 16; // u64: the peer's REDIR at the last ReadyForQuery
    pub const HDR0: i16 = 24; // u64: a split header's bytes: the type in its last byte
    pub const HDR1: i16 = 32; // u64: ... and its length bytes in the first four
    pub const REMAINING: i16 = 40; // u32: body bytes left of the current message
    pub const IS_SERVER: i16 = 44; // u32: the server's socket (framed)
    pub const SLOT: i16 = 48; // u32: deadline slot (client), 0: none
    pub const STOPPED: i16 = 52; // u32: the parser stopped the stream here
    pub const HDR_HAVE: i16 = 56; // u32: bytes of a split header held (0-4)
    pub const LAST_TAG: i16 = 60; // u32: type of the last message begun
    pub const LAST_STATUS: i16 = 64; // u32: the last ReadyForQuery's status
    pub const ZSEEN: i16 = 68; // u32: a ReadyForQuery in this chunk
    pub const SCRATCH: i16 = 72; // u32: the parser's own
    pub const ZPOS: i16 = 76; // u32: where this chunk's last ReadyForQuery body starts
    pub const SIZE: usize = 80;
}

/// The programs and maps, loaded once per process.
pub(crate) struct Kernel {
    sockhash: OwnedFd,
    state: OwnedFd,
    ctl: OwnedFd,
    deadlines: OwnedFd,
    _parser: OwnedFd,
    _verdict: OwnedFd,
    next_slot: AtomicU32,
    /// Serialises writing a deadline's kernel copy with assigning its slot.
    deadline_lock: Mutex<()>,
}

static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();

/// The loaded programs, loading them on first use; the error says why
/// kernel forwarding is unavailable here.
pub(crate) fn get() -> Result<&'static Kernel, &'static str> {
    KERNEL
        .get_or_init(|| Kernel::load().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(String::as_str)
}

/// The programs if they were loaded already (never loads them).
fn loaded() -> Option<&'static Kernel> {
    KERNEL.get().and_then(|r| r.as_ref().ok())
}

#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn ptr<T>(&mut self, off: usize, p: *const T) -> &mut Self {
        self.u64(off, p as usize as u64)
    }
}

fn bpf(cmd: i32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, writable 128-byte bpf_attr; the pointers
    // it holds point to live buffers of the sizes it names.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr() as *mut libc::c_void,
            attr.0.len() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd(r: i64) -> OwnedFd {
    // SAFETY: bpf(2) returned a new file descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

fn map_create(
    kind: u32,
    key: u32,
    value: u32,
    max: u32,
    flags: u32,
    name: &str,
) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, kind)
        .u32(4, key)
        .u32(8, value)
        .u32(12, max)
        .u32(16, flags);
    let n = name.len().min(15);
    a.0[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    bpf(MAP_CREATE, &mut a)
        .map(fd)
        .map_err(|e| io::Error::new(e.kind(), format!("creating the {name} map: {e}")))
}

fn update<K, V>(map: &OwnedFd, key: &K, value: &V, flags: u64) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .ptr(8, key)
        .ptr(16, value)
        .u64(24, flags);
    bpf(MAP_UPDATE_ELEM, &mut a).map(drop)
}

fn lookup<K, V: Default>(map: &OwnedFd, key: &K) -> io::Result<V> {
    let mut v = V::default();
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .ptr(8, key)
        .ptr(16, &mut v as *mut V);
    bpf(MAP_LOOKUP_ELEM, &mut a)?;
    Ok(v)
}

fn delete<K>(map: &OwnedFd, key: &K) {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32).ptr(8, key);
    let _ = bpf(MAP_DELETE_ELEM, &mut a);
}

/// The BTF a program with a callback needs: the verifier accepts a
/// function's address (for `bpf_loop`) only when the program describes
/// its functions. Two: the program itself (global, at instruction 0) and
/// one static callback at `callback`, each returning an int.
struct Funcs {
    btf: OwnedFd,
    info: [[u32; 2]; 2],
}

impl Funcs {
    fn new(callback: usize) -> io::Result<Funcs> {
        const INT: u32 = 1;
        const FUNC: u32 = 12;
        const FUNC_PROTO: u32 = 13;
        // A function's parameters are named (all "x").
        let strings = b"\0int\0keelson_parse\0keelson_walk\0x\0";
        let (int, main, walk, x) = (1u32, 5u32, 19u32, 32u32);
        let types: [u32; 22] = [
            // [1] int: 4 bytes, signed, 32 bits.
            int,
            INT << 24,
            4,
            (1 << 24) | 32,
            // [2] int (int): the program's own.
            0,
            (FUNC_PROTO << 24) | 1,
            1,
            x,
            1,
            // [3] int (int, int): the callback's.
            0,
            (FUNC_PROTO << 24) | 2,
            1,
            x,
            1,
            x,
            1,
            // [4] the program, global.
            main,
            (FUNC << 24) | 1,
            2,
            // [5] the callback, static.
            walk,
            FUNC << 24,
            3,
        ];
        let types_len = (types.len() * 4) as u32;
        let mut blob: Vec<u8> = Vec::new();
        blob.extend(0xeb9fu16.to_ne_bytes());
        blob.extend([1u8, 0]);
        for v in [24u32, 0, types_len, types_len, strings.len() as u32] {
            blob.extend(v.to_ne_bytes());
        }
        for v in types {
            blob.extend(v.to_ne_bytes());
        }
        blob.extend(strings);
        let mut log = vec![0u8; 1 << 16];
        let mut a = Attr::new();
        a.ptr(0, blob.as_ptr())
            .ptr(8, log.as_mut_ptr())
            .u32(16, blob.len() as u32)
            .u32(20, log.len() as u32)
            .u32(24, 1);
        let btf = bpf(BTF_LOAD, &mut a).map(fd).map_err(|e| {
            let text = log_lines(&log, usize::MAX);
            io::Error::new(e.kind(), format!("loading the programs' BTF: {e}: {text}"))
        })?;
        Ok(Funcs {
            btf,
            info: [[0, 4], [callback as u32, 5]],
        })
    }
}

/// The last `n` lines of a kernel log buffer (NUL-terminated), on one line.
fn log_lines(log: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn prog_load(
    insns: &[Insn],
    attach: u32,
    name: &str,
    funcs: Option<&Funcs>,
) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 1 << 20];
    let load = |log_level: u32, log: &mut [u8]| {
        let mut a = Attr::new();
        if let Some(f) = funcs {
            a.u32(72, f.btf.as_raw_fd() as u32)
                .u32(76, 8)
                .ptr(80, f.info.as_ptr())
                .u32(88, f.info.len() as u32);
        }
        a.u32(0, PROG_TYPE_SK_SKB)
            .u32(4, insns.len() as u32)
            .ptr(8, insns.as_ptr())
            .ptr(16, license.as_ptr())
            .u32(24, log_level)
            .u32(28, if log_level > 0 { log.len() as u32 } else { 0 })
            .ptr(
                32,
                if log_level > 0 {
                    log.as_ptr()
                } else {
                    std::ptr::null()
                },
            )
            .u32(68, attach);
        let n = name.len().min(15);
        a.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
        bpf(PROG_LOAD, &mut a).map(fd)
    };
    match load(0, &mut log) {
        Ok(p) => Ok(p),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            // The verifier refused it: load again for its reasons.
            let again = load(1, &mut log);
            let text = log_lines(&log, 12);
            match again {
                Ok(p) => Ok(p),
                Err(_) => Err(io::Error::new(
                    e.kind(),
                    format!("loading the {name} program: {e}: {text}"),
                )),
            }
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("loading the {name} program: {e}"),
        )),
    }
}

fn attach(map: &OwnedFd, prog: &OwnedFd, kind: u32) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u32(4, prog.as_raw_fd() as u32)
        .u32(8, kind);
    bpf(PROG_ATTACH, &mut a).map(drop).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("attaching a program to the sockhash: {e}"),
        )
    })
}

// ---- an assembler for the few instructions the programs use ----

#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const FP: u8 = 10;

#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: Vec<(&'static str, usize)>,
    jumps: Vec<(usize, &'static str)>,
    /// `ld_func` instructions and the label of the function each names.
    funcs: Vec<(usize, &'static str)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        self.insns.push(Insn {
            code,
            regs: dst | (src << 4),
            off,
            imm,
        });
        self
    }
    fn mov_imm(&mut self, d: u8, imm: i32) -> &mut Self {
        self.op(0xb7, d, 0, 0, imm)
    }
    fn mov(&mut self, d: u8, s: u8) -> &mut Self {
        self.op(0xbf, d, s, 0, 0)
    }
    fn add_imm(&mut self, d: u8, imm: i32) -> &mut Self {
        self.op(0x07, d, 0, 0, imm)
    }
    fn add(&mut self, d: u8, s: u8) -> &mut Self {
        self.op(0x0f, d, s, 0, 0)
    }
    fn sub(&mut self, d: u8, s: u8) -> &mut Self {
        self.op(0x1f, d, s, 0, 0)
    }
    fn be32(&mut self, d: u8) -> &mut Self {
        self.op(0xdc, d, 0, 0, 32)
    }
    fn ldx_b(&mut self, d: u8, s: u8, off: i16) -> &mut Self {
        self.op(0x71, d, s, off, 0)
    }
    fn ldx_w(&mut self, d: u8, s: u8, off: i16) -> &mut Self {
        self.op(0x61, d, s, off, 0)
    }
    fn ldx_dw(&mut self, d: u8, s: u8, off: i16) -> &mut Self {
        self.op(0x79, d, s, off, 0)
    }
    fn stx_w(&mut self, d: u8, off: i16, s: u8) -> &mut Self {
        self.op(0x63, d, s, off, 0)
    }
    fn stx_dw(&mut self, d: u8, off: i16, s: u8) -> &mut Self {
        self.op(0x7b, d, s, off, 0)
    }
    fn st_w(&mut self, d: u8, off: i16, imm: i32) -> &mut Self {
        self.op(0x62, d, 0, off, imm)
    }
    fn jump(&mut self, code: u8, d: u8, s: u8, imm: i32, to: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), to));
        self.op(code, d, s, 0, imm)
    }
    fn ja(&mut self, to: &'static str) -> &mut Self {
        self.jump(0x05, 0, 0, 0, to)
    }
    fn jeq_imm(&mut self, d: u8, imm: i32, to: &'static str) -> &mut Self {
        self.jump(0x15, d, 0, imm, to)
    }
    fn jne_imm(&mut self, d: u8, imm: i32, to: &'static str) -> &mut Self {
        self.jump(0x55, d, 0, imm, to)
    }
    fn jlt_imm(&mut self, d: u8, imm: i32, to: &'static str) -> &mut Self {
        self.jump(0xa5, d, 0, imm, to)
    }
    fn jge_imm(&mut self, d: u8, imm: i32, to: &'static str) -> &mut Self {
        self.jump(0x35, d, 0, imm, to)
    }
    fn jle(&mut self, d: u8, s: u8, to: &'static str) -> &mut Self {
        self.jump(0xbd, d, s, 0, to)
    }
    fn jlt(&mut self, d: u8, s: u8, to: &'static str) -> &mut Self {
        self.jump(0xad, d, s, 0, to)
    }
    fn call(&mut self, helper: i32) -> &mut Self {
        self.op(0x85, 0, 0, 0, helper)
    }
    fn sub_imm(&mut self, d: u8, imm: i32) -> &mut Self {
        self.add_imm(d, -imm)
    }
    fn st_dw(&mut self, d: u8, off: i16, imm: i32) -> &mut Self {
        self.op(0x7a, d, 0, off, imm)
    }
    fn jgt_imm(&mut self, d: u8, imm: i32, to: &'static str) -> &mut Self {
        self.jump(0x25, d, 0, imm, to)
    }
    /// One byte of the skb (context in R6) at offset R2 to `fp + to`;
    /// R0 is 0 if it was there.
    fn call_load(&mut self, to: i16) -> &mut Self {
        self.mov(R1, R6)
            .mov(R3, FP)
            .add_imm(R3, to as i32)
            .mov_imm(R4, 1)
            .call(HELPER_SKB_LOAD_BYTES)
    }
    fn exit(&mut self) -> &mut Self {
        self.op(0x95, 0, 0, 0, 0)
    }
    /// Loads a map's address (by its fd) into `d`.
    fn ld_map(&mut self, d: u8, map: &OwnedFd) -> &mut Self {
        self.op(0x18, d, 1, 0, map.as_raw_fd());
        self.op(0, 0, 0, 0, 0)
    }
    /// `r0 = lookup(map, fp + key)`.
    fn lookup(&mut self, map: &OwnedFd, key: i16) -> &mut Self {
        self.ld_map(R1, map)
            .mov(R2, FP)
            .add_imm(R2, key as i32)
            .call(HELPER_MAP_LOOKUP)
    }
    /// The 5 header bytes at the skb's (R6) offset R8 to `fp + at`, R8
    /// then past them; on to `lost` if they are not there.
    fn load_header(&mut self, at: i16, loaded: &'static str, lost: &'static str) -> &mut Self {
        self.mov(R2, R8)
            .mov(R1, R6)
            .mov(R3, FP)
            .add_imm(R3, at as i32)
            .mov_imm(R4, 5)
            .call(HELPER_SKB_LOAD_BYTES)
            .jeq_imm(R0, 0, loaded)
            .ja(lost)
            .label(loaded)
            .add_imm(R8, 5)
    }
    /// A message's header, at `fp + at` (the type, then the length), as
    /// the walk reads it: R2 becomes the body's length (or, for a length
    /// below 4, which PostgreSQL never sends, on to `lost`); the type is
    /// the state's last, and a ReadyForQuery's body position (R8) is kept,
    /// its status byte read once the walk is done. Goes on at `sized`.
    fn header(
        &mut self,
        at: i16,
        ok: &'static str,
        lost: &'static str,
        sized: &'static str,
    ) -> &mut Self {
        self.ldx_w(R2, FP, at + 1)
            .be32(R2)
            .jge_imm(R2, 4, ok)
            .ja(lost)
            .label(ok)
            .sub_imm(R2, 4)
            .ldx_b(R1, FP, at)
            .stx_w(R7, st::LAST_TAG, R1)
            .jne_imm(R1, b'Z' as i32, sized)
            .st_w(R7, st::ZSEEN, 1)
            .stx_w(R7, st::ZPOS, R8)
            .label(sized)
    }
    /// Loads the address of the BPF function at `label` into `d` (for a
    /// helper that calls back, such as `bpf_loop`).
    fn ld_func(&mut self, d: u8, label: &'static str) -> &mut Self {
        self.funcs.push((self.insns.len(), label));
        self.op(0x18, d, 4, 0, 0);
        self.op(0, 0, 0, 0, 0)
    }
    /// Where `label` is, in instructions from the start.
    fn at(&self, label: &str) -> usize {
        self.labels
            .iter()
            .find(|(n, _)| *n == label)
            .unwrap_or_else(|| panic!("no label {label}"))
            .1
    }
    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.push((name, self.insns.len()));
        self
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in std::mem::take(&mut self.jumps) {
            let target = self.at(to);
            self.insns[at].off = (target as isize - at as isize - 1) as i16;
        }
        for (at, to) in std::mem::take(&mut self.funcs) {
            let target = self.at(to);
            self.insns[at].imm = (target as isize - at as isize - 1) as i32;
        }
        self.insns
    }
}

/// Where `bpf_loop` is missing (before Linux 5.17), the most messages one
/// parser run walks, unrolled by the verifier, largest first: each bounds
/// the verifier's work (2048 took 747,118 of its 1,000,000 instructions
/// on 6.18), and a kernel whose verifier refuses one gets the next. A
/// chunk with more messages loses the stream's boundaries (the session
/// can then not be fenced cleanly: it is closed).
const WALKS: [i32; 3] = [2048, 512, 128];

/// The error the parser stops a stream with: the kernel's stream parser
/// then stops for good, leaving the chunk and everything after it in the
/// socket's receive queue, unread, and sets it as the socket's error
/// (which the proxy clears).
const STOP: i32 = libc::ECANCELED;

/// `REMAINING` once the server's boundaries are lost.
const LOST: i32 = 0x7fff_ffff;

/// The stream parser: every chunk is all that arrived (the kernel shows
/// the parser the whole buffer from its start, not from where an earlier
/// chunk ended, so a chunk never ends inside one), or `-STOP` to stop the
/// stream for good: once fenced, or (the client's) past its view's
/// deadline. The server's messages are followed through every chunk (1
/// type byte, a 4-byte length; a header split between chunks is kept in
/// the state), so that the proxy taking the session back knows where in
/// a message the stream stands.
fn parser(state: &OwnedFd, ctl: &OwnedFd, deadlines: &OwnedFd, walk: Walk) -> (Vec<Insn>, usize) {
    let mut a = Asm::default();
    // Stack: -8 cookie, -16 fenced, -24 len, -32 slot (client), -40
    // deadline (client); the server's header at -41 (type) and -40..-37
    // (length), in the dwords at -48 and -40; -56 a status byte.
    a.mov(R6, R1)
        .mov(R1, R6)
        .call(HELPER_GET_SOCKET_COOKIE)
        .stx_dw(FP, -8, R0)
        .lookup(state, -8)
        .jeq_imm(R0, 0, "whole")
        .mov(R7, R0)
        .lookup(ctl, -8)
        .mov_imm(R1, 0)
        .jeq_imm(R0, 0, "nf")
        .ldx_w(R1, R0, 0)
        .label("nf")
        .jne_imm(R1, 0, "stop")
        .ldx_w(R2, R7, st::IS_SERVER)
        .jeq_imm(R2, 0, "client")
        .ldx_w(R1, R6, 0)
        .stx_dw(FP, -24, R1)
        .mov_imm(R8, 0)
        .mov_imm(R9, 0)
        .ldx_w(R2, R7, st::REMAINING)
        .jeq_imm(R2, LOST, "done")
        .jeq_imm(R2, 0, "no_body")
        // A ReadyForQuery's status byte opens this chunk.
        .jne_imm(R2, 1, "body")
        .ldx_w(R3, R7, st::LAST_TAG)
        .jne_imm(R3, b'Z' as i32, "body")
        .mov_imm(R2, 0)
        .call_load(-56)
        .jne_imm(R0, 0, "body_reload")
        .ldx_b(R3, FP, -56)
        .stx_w(R7, st::LAST_STATUS, R3)
        .label("body_reload")
        .ldx_w(R2, R7, st::REMAINING)
        .ldx_dw(R1, FP, -24)
        .label("body")
        // Inside a message: all of this chunk is its body, or the body
        // ends here and the walk goes on from there.
        .jlt(R2, R1, "rem_inside")
        .sub(R2, R1)
        .stx_w(R7, st::REMAINING, R2)
        .ja("done")
        .label("rem_inside")
        .mov(R8, R2)
        .st_w(R7, st::REMAINING, 0)
        .ja("walk")
        .label("no_body")
        .ldx_w(R3, R7, st::HDR_HAVE)
        .jeq_imm(R3, 0, "walk")
        // The rest of a split header opens this chunk.
        .ldx_dw(R1, R7, st::HDR0)
        .stx_dw(FP, -48, R1)
        .ldx_dw(R1, R7, st::HDR1)
        .stx_dw(FP, -40, R1);
    for i in 1..5i32 {
        let next: &'static str = Box::leak(format!("hdr_{i}").into_boxed_str());
        a.ldx_w(R3, R7, st::HDR_HAVE)
            .jgt_imm(R3, i, next)
            .mov_imm(R2, i)
            .sub(R2, R3)
            .call_load(-41 + i as i16)
            .jeq_imm(R0, 0, next)
            .st_w(R7, st::HDR_HAVE, i)
            .ja("keep_hdr")
            .label(next);
    }
    a.ldx_w(R3, R7, st::HDR_HAVE)
        .mov_imm(R8, 5)
        .sub(R8, R3)
        .st_w(R7, st::HDR_HAVE, 0)
        .ja("header")
        .label("walk");
    if let Walk::Unrolled(walk) = walk {
        // In the loop every conditional jump goes on with the walk and
        // falls through to an end: the verifier explores the fall-through
        // first and keeps the jump's target pending, so what it keeps
        // pending stays one state deep, not one per message.
        a.label("loop")
            .jlt_imm(R9, walk, "c1")
            .ja("lost")
            .label("c1")
            .add_imm(R9, 1)
            .ldx_dw(R1, FP, -24)
            .mov(R2, R1)
            .sub(R2, R8)
            .jne_imm(R2, 0, "c2")
            .ja("done")
            .label("c2")
            .jge_imm(R2, 5, "c3")
            .ja("split")
            .label("c3")
            .load_header(-41, "c4", "lost");
    } else {
        // bpf_loop walks the messages, one callback per message, with the
        // skb, the state and the position in a context on this stack:
        // -88 the outcome, -80 the position, -72 the state, -64 the skb.
        a.label("loop")
            .stx_dw(FP, -64, R6)
            .stx_dw(FP, -72, R7)
            .stx_dw(FP, -80, R8)
            .st_dw(FP, -88, 0)
            .mov_imm(R1, LOOPS)
            .ld_func(R2, "walk_one")
            .mov(R3, FP)
            .add_imm(R3, -88)
            .mov_imm(R4, 0)
            .call(HELPER_LOOP)
            .ldx_dw(R8, FP, -80)
            .ldx_dw(R2, FP, -88)
            .jeq_imm(R2, AT_END, "done")
            .jeq_imm(R2, SPANS, "done")
            // Lost, or (never) more messages than LOOPS.
            .jne_imm(R2, SPLIT, "lost")
            .ldx_dw(R1, FP, -24)
            .mov(R2, R1)
            .sub(R2, R8)
            .ja("split");
    }
    a.label("header")
        // A whole header at -41; the body starts at R8.
        .header(-41, "c5", "lost", "sized")
        .ldx_dw(R1, FP, -24)
        .mov(R3, R1)
        .sub(R3, R8)
        .jle(R2, R3, "fits")
        .ja("spans")
        .label("fits")
        .add(R8, R2)
        // Through the map and back: the verifier then knows nothing of
        // R8's range, so the paths of one iteration meet as one state and
        // its work grows with the walk's length, not with the paths'
        // product.
        .stx_w(R7, st::SCRATCH, R8)
        .ldx_w(R8, R7, st::SCRATCH)
        .ja("loop")
        .label("spans")
        // The message goes on past this chunk.
        .sub(R2, R3)
        .stx_w(R7, st::REMAINING, R2)
        .ja("done")
        .label("split")
        // A header split between this chunk and the next: its first
        // bytes are kept. R2 (1-4) of them are here.
        .stx_dw(FP, -32, R2)
        .st_dw(FP, -48, 0)
        .st_dw(FP, -40, 0);
    for i in 0..4i32 {
        a.ldx_dw(R3, FP, -32)
            .jlt_imm(R3, i + 1, "split_end")
            .mov(R2, R8)
            .add_imm(R2, i)
            .call_load(-41 + i as i16)
            .jne_imm(R0, 0, "lost");
    }
    a.label("split_end")
        .ldx_dw(R3, FP, -32)
        .stx_w(R7, st::HDR_HAVE, R3)
        .label("keep_hdr")
        .ldx_dw(R1, FP, -48)
        .stx_dw(R7, st::HDR0, R1)
        .ldx_dw(R1, FP, -40)
        .stx_dw(R7, st::HDR1, R1)
        .ja("done")
        .label("lost")
        // A length below 4 (PostgreSQL never sends one), or more messages
        // than one run walks: no boundary is known from here on.
        .st_w(R7, st::REMAINING, LOST)
        .label("done")
        .ldx_w(R1, R7, st::ZSEEN)
        .jeq_imm(R1, 0, "out")
        .st_w(R7, st::ZSEEN, 0)
        // The last ReadyForQuery's status, unless it is the next chunk's
        // first byte.
        .ldx_w(R2, R7, st::ZPOS)
        .call_load(-56)
        .jne_imm(R0, 0, "zredir")
        .ldx_b(R3, FP, -56)
        .stx_w(R7, st::LAST_STATUS, R3)
        .label("zredir")
        .ldx_dw(R1, R7, st::PEER)
        .stx_dw(FP, -8, R1)
        .lookup(state, -8)
        .jeq_imm(R0, 0, "out")
        .ldx_dw(R1, R0, st::REDIR)
        .stx_dw(R7, st::ZREDIR, R1)
        .label("out")
        .ldx_dw(R0, FP, -24)
        .exit()
        .label("client")
        // The client's: one chunk per arrival, until past the view's
        // deadline.
        .ldx_w(R1, R7, st::SLOT)
        .jeq_imm(R1, 0, "whole")
        .stx_w(FP, -32, R1)
        .lookup(deadlines, -32)
        .jeq_imm(R0, 0, "whole")
        .ldx_dw(R1, R0, 0)
        .stx_dw(FP, -40, R1)
        .call(HELPER_KTIME_GET_NS)
        .ldx_dw(R1, FP, -40)
        .jlt(R0, R1, "whole")
        .label("stop")
        .st_w(R7, st::STOPPED, 1)
        .mov_imm(R0, -STOP)
        .exit()
        .label("whole")
        .ldx_w(R0, R6, 0)
        .exit();
    if walk == Walk::Loop {
        walk_one(&mut a);
    }
    let callback = if walk == Walk::Loop {
        a.at("walk_one")
    } else {
        0
    };
    (a.finish(), callback)
}

/// How the parser walks a chunk's messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Walk {
    /// With `bpf_loop` (Linux 5.17): any number of messages.
    Loop,
    /// Unrolled by the verifier, at most this many.
    Unrolled(i32),
}

/// Iterations `bpf_loop` may run (its own limit): every message is at
/// least 5 bytes, so no chunk (at most a receive buffer) needs more.
const LOOPS: i32 = 1 << 23;
/// The walk's outcomes, in its context: the chunk ends at a boundary;
/// its last bytes are a split header; a message goes on past it; (else)
/// the boundaries are lost.
const AT_END: i32 = 1;
const SPLIT: i32 = 2;
const SPANS: i32 = 3;
const LOST_HERE: i32 = 4;

/// `bpf_loop`'s callback: one message of the walk. R2 is the context on
/// the parser's stack (see `parser`); it returns 0 to go on, 1 once the
/// walk ended (its outcome is in the context).
fn walk_one(a: &mut Asm) {
    // Stack: -9 the header (type, then the length at -8).
    a.label("walk_one")
        .mov(R9, R2)
        .ldx_dw(R6, R9, 24)
        .ldx_dw(R7, R9, 16)
        .ldx_dw(R8, R9, 8)
        .ldx_w(R1, R6, 0)
        .mov(R2, R1)
        .sub(R2, R8)
        .jne_imm(R2, 0, "w_more")
        .st_dw(R9, 0, AT_END)
        .ja("w_end")
        .label("w_more")
        .jge_imm(R2, 5, "w_header")
        .st_dw(R9, 0, SPLIT)
        .ja("w_end")
        .label("w_header")
        .load_header(-9, "w_loaded", "w_lost")
        .header(-9, "w_len", "w_lost", "w_sized")
        .ldx_w(R1, R6, 0)
        .mov(R3, R1)
        .sub(R3, R8)
        .jle(R2, R3, "w_fits")
        // The message goes on past this chunk.
        .sub(R2, R3)
        .stx_w(R7, st::REMAINING, R2)
        .st_dw(R9, 0, SPANS)
        .ja("w_end")
        .label("w_fits")
        .add(R8, R2)
        .stx_dw(R9, 8, R8)
        .mov_imm(R0, 0)
        .exit()
        .label("w_lost")
        .st_dw(R9, 0, LOST_HERE)
        .label("w_end")
        .stx_dw(R9, 8, R8)
        .mov_imm(R0, 1)
        .exit();
}

/// The verdict: every chunk the parser cut goes to the peer's send queue.
fn verdict(sockhash: &OwnedFd, state: &OwnedFd) -> Vec<Insn> {
    let mut a = Asm::default();
    // Stack: -8 cookie, -16 peer cookie.
    a.mov(R6, R1)
        .mov(R1, R6)
        .call(HELPER_GET_SOCKET_COOKIE)
        .stx_dw(FP, -8, R0)
        .lookup(state, -8)
        .jeq_imm(R0, 0, "drop")
        .ldx_w(R1, R6, 0)
        .ldx_dw(R2, R0, st::REDIR)
        .add(R2, R1)
        .stx_dw(R0, st::REDIR, R2)
        .ldx_dw(R1, R0, st::PEER)
        .stx_dw(FP, -16, R1)
        .mov(R1, R6)
        .ld_map(R2, sockhash)
        .mov(R3, FP)
        .add_imm(R3, -16)
        .mov_imm(R4, 0)
        .call(HELPER_SK_REDIRECT_HASH)
        .exit()
        .label("drop")
        // A session whose state is gone is closing: nobody reads its
        // bytes any more.
        .mov_imm(R0, 0)
        .exit();
    a.finish()
}

impl Kernel {
    fn load() -> io::Result<Kernel> {
        let sockhash = map_create(
            MAP_TYPE_SOCKHASH,
            8,
            4,
            2 * MAX_SESSIONS,
            0,
            "keelson_socks",
        )?;
        let state = map_create(
            MAP_TYPE_HASH,
            8,
            st::SIZE as u32,
            2 * MAX_SESSIONS,
            F_NO_PREALLOC,
            "keelson_state",
        )?;
        let ctl = map_create(
            MAP_TYPE_HASH,
            8,
            4,
            2 * MAX_SESSIONS,
            F_NO_PREALLOC,
            "keelson_ctl",
        )?;
        let deadlines = map_create(MAP_TYPE_ARRAY, 4, 8, DEADLINE_SLOTS, 0, "keelson_dl")?;
        let (insns, callback) = parser(&state, &ctl, &deadlines, Walk::Loop);
        let looped = Funcs::new(callback)
            .and_then(|f| prog_load(&insns, SK_SKB_STREAM_PARSER, "keelson_parse", Some(&f)));
        let parser = match looped {
            Ok(p) => p,
            Err(e) => {
                // An older kernel (no bpf_loop, no BTF): a walk of at most
                // so many messages per chunk.
                let mut parser_prog = Err(io::Error::other("no walk length"));
                for walk in WALKS {
                    parser_prog = prog_load(
                        &parser(&state, &ctl, &deadlines, Walk::Unrolled(walk)).0,
                        SK_SKB_STREAM_PARSER,
                        "keelson_parse",
                        None,
                    )
                    .inspect(|_| {
                        tracing::info!(
                            error = %e,
                            "kernel forwarding: the stream parser walks at most {walk} messages per chunk"
                        )
                    });
                    match &parser_prog {
                        Err(e) if e.raw_os_error() == Some(libc::E2BIG) => continue,
                        _ => break,
                    }
                }
                parser_prog?
            }
        };
        let verdict = prog_load(
            &verdict(&sockhash, &state),
            SK_SKB_STREAM_VERDICT,
            "keelson_verdict",
            None,
        )?;
        attach(&sockhash, &parser, SK_SKB_STREAM_PARSER)?;
        attach(&sockhash, &verdict, SK_SKB_STREAM_VERDICT)?;
        Ok(Kernel {
            sockhash,
            state,
            ctl,
            deadlines,
            _parser: parser,
            _verdict: verdict,
            next_slot: AtomicU32::new(1),
            deadline_lock: Mutex::new(()),
        })
    }

    /// The deadline's slot in the kernel, assigned (and written) on first
    /// use; `None` once all slots are taken.
    fn slot(&self, d: &Deadline) -> Option<u32> {
        if let Some(&s) = d.kernel_slot.get() {
            return Some(s);
        }
        let _g = self.deadline_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&s) = d.kernel_slot.get() {
            return Some(s);
        }
        let s = self.next_slot.fetch_add(1, Ordering::Relaxed);
        if s >= DEADLINE_SLOTS {
            return None;
        }
        self.write_deadline(s, d).ok()?;
        let _ = d.kernel_slot.set(s);
        Some(s)
    }

    fn write_deadline(&self, slot: u32, d: &Deadline) -> io::Result<()> {
        let ns = d.get().map_or(u64::MAX, ktime_of);
        update(&self.deadlines, &slot, &ns, 0)
    }
}

/// Called by [`Deadline`] whenever it is set: the kernel's copy follows,
/// under the lock that orders it with a slot being assigned.
pub(crate) fn deadline_set(d: &Deadline, set: impl FnOnce()) {
    let Some(k) = loaded() else {
        return set();
    };
    let _g = k.deadline_lock.lock().unwrap_or_else(|e| e.into_inner());
    set();
    if let Some(&slot) = d.kernel_slot.get() {
        if let Err(e) = k.write_deadline(slot, d) {
            // Not expected (an array map's update cannot fail for a valid
            // slot); the kernel copy is then stale, so end it: an earlier
            // deadline is the safe direction.
            tracing::warn!(error = %e, "could not update the kernel's copy of a view's deadline");
            let _ = update(&k.deadlines, &slot, &0u64, 0);
        }
    }
}

/// The kernel's monotonic clock (what `bpf_ktime_get_ns` reads) at `t`.
fn ktime_of(t: Instant) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let at = Instant::now();
    if t >= at {
        now.saturating_add((t - at).as_nanos() as u64)
    } else {
        now.saturating_sub((at - t).as_nanos() as u64)
    }
}

/// A socket's state, as the kernel last wrote it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct State {
    peer: u64,
    redir: u64,
    zredir: u64,
    hdr0: u64,
    hdr1: u64,
    remaining: u32,
    is_server: u32,
    slot: u32,
    stopped: u32,
    hdr_have: u32,
    last_tag: u32,
    last_status: u32,
    zseen: u32,
    scratch: u32,
    zpos: u32,
}

const _: () = assert!(std::mem::size_of::<State>() == st::SIZE);

fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut c = 0u64;
    let mut len = 8 as libc::socklen_t;
    // SAFETY: a writable u64 and its length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_COOKIE,
            &mut c as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(c)
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD and SIOCOUTQ write one int.
    if unsafe { libc::ioctl(fd, req as _, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as u64)
}

/// Bytes not yet read from `fd`. Takes the socket's lock: every stream
/// parser or verdict run that had begun has finished when it returns.
fn unread(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD as libc::c_ulong)
}

/// Every byte ever written to `fd`'s send queue (acknowledged ones, then
/// those still queued; read in that order, the sum is never too high).
fn written(fd: RawFd) -> io::Result<u64> {
    let mut info = [0u8; 232];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a writable buffer and its length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < 128 {
        return Err(io::Error::other("TCP_INFO has no tcpi_bytes_acked"));
    }
    let acked = u64::from_ne_bytes(info[120..128].try_into().expect("8 bytes"));
    Ok(acked + ioctl_int(fd, SIOCOUTQ)?)
}

/// Stops these sockets' streams at their next chunk, as a fence does to
/// its kernel-mode sessions before their tasks run ([`Fence::trigger`]).
pub(crate) fn stop_streams(cookies: &[u64]) {
    if cookies.is_empty() {
        return;
    }
    if let Ok(k) = get() {
        for c in cookies {
            // Fails only if the socket's flags cannot be written (the map
            // full): its session stops when its task takes it back.
            let _ = update(&k.ctl, c, &1u32, 0);
        }
    }
}

/// One session in the kernel: its sockets' cookies and how much each had
/// been sent before.
pub(crate) struct Handed {
    k: &'static Kernel,
    /// The session's fence, which stops its streams in the kernel when it
    /// fires.
    fence: std::sync::Arc<Fence>,
    client: u64,
    server: u64,
    client_fd: RawFd,
    server_fd: RawFd,
    base_client: u64,
    base_server: u64,
    /// Both sockets are out of the sockhash.
    released: bool,
}

impl Handed {
    /// Hands the two sockets to the kernel: `Ok(Err(why))` (and the session
    /// stays in user space) if either has bytes waiting or no deadline
    /// slot is left; an error if the maps are full.
    /// Call it when neither side can have bytes in flight: after
    /// authentication, before the client has read its first
    /// ReadyForQuery.
    pub(crate) fn hand_off(
        k: &'static Kernel,
        client: &TcpStream,
        server: &TcpStream,
        deadline: Option<&Deadline>,
        fence: &std::sync::Arc<Fence>,
    ) -> io::Result<Result<Handed, &'static str>> {
        Self::hand_off_with(k, client, server, deadline, fence, || {})
    }

    /// [`Handed::hand_off`], running `between` once the server's socket is
    /// in the sockhash and the client's not yet (for tests).
    fn hand_off_with(
        k: &'static Kernel,
        client: &TcpStream,
        server: &TcpStream,
        deadline: Option<&Deadline>,
        fence: &std::sync::Arc<Fence>,
        between: impl FnOnce(),
    ) -> io::Result<Result<Handed, &'static str>> {
        let (cfd, sfd) = (client.as_raw_fd(), server.as_raw_fd());
        if unread(cfd)? != 0 || unread(sfd)? != 0 {
            return Ok(Err("pending_bytes"));
        }
        let slot = match deadline {
            Some(d) => match k.slot(d) {
                Some(s) => s,
                None => return Ok(Err("no_slot")),
            },
            None => 0,
        };
        let (cc, sc) = (cookie(cfd)?, cookie(sfd)?);
        let h = Handed {
            k,
            fence: fence.clone(),
            client: cc,
            server: sc,
            client_fd: cfd,
            server_fd: sfd,
            base_client: written(cfd)?,
            base_server: written(sfd)?,
            released: false,
        };
        let fresh = |peer, is_server, slot| State {
            peer,
            is_server,
            slot,
            last_tag: b'Z' as u32,
            last_status: b'I' as u32,
            ..State::default()
        };
        // From here `h` deletes what it inserted if a step fails.
        update(&k.state, &cc, &fresh(sc, 0, slot), NOEXIST)?;
        update(&k.state, &sc, &fresh(cc, 1, 0), NOEXIST)?;
        // The server's socket first: it has sent everything up to its first
        // ReadyForQuery and is silent until the client sends, while bytes
        // a client sends early wait in its socket's queue until the client
        // socket is in (the kernel parses what is queued when a socket
        // enters). A chunk redirected to a socket not yet in the sockhash
        // would be dropped, so the server's stream enters stopped: what it
        // sends unasked meanwhile (a FATAL as it is terminated, a notice)
        // stays in its socket, the stopped stream wakes the session, and
        // the proxy takes it back and forwards it in user space.
        update(&k.ctl, &sc, &1u32, 0)?;
        update(&k.sockhash, &sc, &(sfd as u32), NOEXIST)?;
        between();
        if let Err(e) = update(&k.sockhash, &cc, &(cfd as u32), NOEXIST) {
            // Nothing moved: the server's stream stopped if it sent, and
            // what it sent is in its socket; the stop's error is cleared
            // for the user-space path.
            delete(&k.sockhash, &sc);
            let _ = socket_error(sfd);
            return Err(e);
        }
        // Should the flag stay set (not expected: the entry exists), the
        // server's stream stops at its first chunk and the session is
        // taken back: safe either way.
        let _ = update(&k.ctl, &sc, &0u32, 0);
        if fence.enter_kernel([cc, sc]) {
            stop_streams(&[cc, sc]);
        }
        Ok(Ok(h))
    }

    /// The proxy wrote `n` bytes to the client itself.
    pub(crate) fn wrote_to_client(&mut self, n: usize) {
        self.base_client += n as u64;
    }

    fn state(&self, c: u64) -> io::Result<State> {
        lookup(&self.k.state, &c)
    }

    /// Whether the parser stopped socket `c`'s stream.
    fn stopped(&self, c: u64) -> bool {
        self.state(c).is_ok_and(|s| s.stopped != 0)
    }

    /// Bytes moved by the kernel: client to server, server to client.
    pub(crate) fn moved(&self) -> (u64, u64) {
        let c = self.state(self.client).map(|s| s.redir).unwrap_or(0);
        let s = self.state(self.server).map(|s| s.redir).unwrap_or(0);
        (c, s)
    }

    /// Whether every byte the kernel took from `from` is in `to`'s send
    /// queue, `to` having had `base` bytes before.
    fn delivered(&self, from: u64, to: RawFd, base: u64) -> io::Result<bool> {
        let moved = self.state(from)?.redir;
        Ok(written(to)? >= base + moved)
    }

    /// Waits (until `limit`) for what the kernel took from `from` to be
    /// in `to`'s send queue; whether it was.
    async fn flushed(&self, from: u64, to: RawFd, base: u64, limit: Instant) -> bool {
        loop {
            match self.delivered(from, to, base) {
                Ok(true) => return true,
                Ok(false) if Instant::now() < limit => {}
                _ => return false,
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Before the client's socket closes: what the kernel took from it
    /// reaches the server (its Terminate, say).
    pub(crate) async fn flush_to_server(&self) -> bool {
        let limit = Instant::now() + crate::forward::FENCE_DEADLINE;
        self.flushed(self.client, self.server_fd, self.base_server, limit)
            .await
    }

    /// Before the client's write side is shut: what the kernel took from
    /// the server reaches the client.
    pub(crate) async fn flush_to_client(&self) -> bool {
        let limit = Instant::now() + crate::forward::FENCE_DEADLINE;
        self.flushed(self.server, self.client_fd, self.base_client, limit)
            .await
    }

    /// Takes the session back to user space, with nothing the kernel took
    /// still in flight and both sockets out of the sockhash: the tracker
    /// describing where the server's stream stands (inside a message, it
    /// may be: the proxy forwards the rest of it before any FATAL), and
    /// whether client bytes went out since its last ReadyForQuery.
    /// `Ok(None)` if what the kernel redirected was not sent by `limit`
    /// (the session is then still in the kernel, stopped: end it).
    ///
    /// The parsers stop both streams at their next chunk, so every byte
    /// after the stop is still in its socket's receive queue, where the
    /// proxy reads it as it would have without the kernel. Nothing ever
    /// passes through the sockhash's own receive path (whose accounting
    /// stalls streams the proxy reads slower than they arrive).
    pub(crate) async fn take_back(
        &mut self,
        limit: Instant,
    ) -> io::Result<Option<(MessageTracker, bool)>> {
        let k = self.k;
        update(&k.ctl, &self.client, &1u32, 0)?;
        update(&k.ctl, &self.server, &1u32, 0)?;
        // Barriers: every chunk from here on stops its stream, so the
        // states read now are the last.
        unread(self.client_fd)?;
        unread(self.server_fd)?;
        let server = self.state(self.server)?;
        let client = self.state(self.client)?;
        // What the kernel redirected is in the send queues before the
        // sockets leave the sockhash (leaving drops what is still queued).
        if !self
            .flushed(self.client, self.server_fd, self.base_server, limit)
            .await
            || !self
                .flushed(self.server, self.client_fd, self.base_client, limit)
                .await
        {
            return Ok(None);
        }
        self.release()?;
        let (h0, h1) = (server.hdr0.to_le_bytes(), server.hdr1.to_le_bytes());
        let header = [h0[7], h1[0], h1[1], h1[2], h1[3]];
        let have = (server.hdr_have as usize).min(4);
        let tracker = MessageTracker::resume(
            server.last_tag as u8,
            server.last_status as u8,
            &header[..have],
            server.remaining as usize,
            server.remaining == LOST as u32,
            client.redir > 0,
        );
        Ok(Some((tracker, client.redir != server.zredir)))
    }

    /// Takes both sockets out of the sockhash, once nothing redirected is
    /// queued, and clears the error a stopped parser left on each.
    fn release(&mut self) -> io::Result<()> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        // Both leave, whatever the first's error.
        let mut first = Ok(());
        for (c, fd) in [(self.client, self.client_fd), (self.server, self.server_fd)] {
            delete(&self.k.sockhash, &c);
            let r = match socket_error(fd) {
                Ok(0 | STOP) => Ok(()),
                Ok(e) => Err(io::Error::from_raw_os_error(e)),
                Err(e) => Err(e),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// After [`Handed::take_back`]: both sockets get a fresh registration
    /// with the runtime. A stopped stream's socket error woke epoll with
    /// an error, which tokio keeps for good as write-closed readiness: on
    /// the old registration every write that would block would spin.
    pub(crate) fn rebind(
        &mut self,
        client: &mut TcpStream,
        server: &mut TcpStream,
    ) -> io::Result<()> {
        reregister(client)?;
        reregister(server)?;
        self.client_fd = client.as_raw_fd();
        self.server_fd = server.as_raw_fd();
        Ok(())
    }

    /// Waits, holding no buffer, until the session needs the proxy. Polls
    /// the sockets' readiness directly (no waiter nodes), so an idle
    /// session's future stays small.
    pub(crate) async fn wait(
        &self,
        client: &TcpStream,
        server: &TcpStream,
        fence: &Fence,
    ) -> Woken {
        use crate::protocol::Side;
        use std::future::Future;
        use std::task::Poll;
        let notified = fence.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        std::future::poll_fn(|cx| {
            if fence.is_fired() || notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woken::Fenced);
            }
            // The parser stopped the client's stream (the view's deadline
            // passed): its bytes wait in the socket.
            if let Poll::Ready(r) = poll_peek(client, cx, || self.stopped(self.client)) {
                return Poll::Ready(match r {
                    Ok(Some(0)) => Woken::ClientClosed,
                    Ok(_) => Woken::Passed,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                        ) =>
                    {
                        Woken::ClientClosed
                    }
                    Err(e) => Woken::Error(Side::Client, e),
                });
            }
            // The server's stream stopped as it entered the kernel (see
            // `hand_off`): its bytes wait in the socket.
            if let Poll::Ready(r) = poll_peek(server, cx, || self.stopped(self.server)) {
                return Poll::Ready(match r {
                    Ok(Some(0)) => Woken::ServerClosed,
                    Ok(_) => Woken::Passed,
                    Err(e) => Woken::Error(Side::Backend, e),
                });
            }
            Poll::Pending
        })
        .await
    }
}

/// Polls `s` until it has something to say: `Ok(None)` once readable and
/// `stopped`, else what a one-byte peek read (`Some(0)` at EOF). A peek
/// that would block clears the readiness, so the next poll registers the
/// waker again.
fn poll_peek(
    s: &TcpStream,
    cx: &mut std::task::Context<'_>,
    stopped: impl Fn() -> bool,
) -> std::task::Poll<io::Result<Option<usize>>> {
    use std::task::Poll;
    loop {
        match s.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        if stopped() {
            return Poll::Ready(Ok(None));
        }
        match peek(s) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return Poll::Ready(r.map(Some)),
        }
    }
}

/// Replaces `s` with the same socket under a new descriptor and a new
/// registration with the runtime (no readiness carried over).
fn reregister(s: &mut TcpStream) -> io::Result<()> {
    // SAFETY: duplicates an open descriptor; the copy is owned below.
    let fd = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just duplicated and nothing else owns it.
    let copy = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    copy.set_nonblocking(true)?;
    let fresh = TcpStream::from_std(copy)?;
    // Dropping the old stream deregisters and closes its descriptor; the
    // socket stays open under the new one.
    drop(std::mem::replace(s, fresh));
    Ok(())
}

/// Reads and clears a socket's pending error.
fn socket_error(fd: RawFd) -> io::Result<i32> {
    let mut e: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a writable int and its length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut e as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(e)
}

impl Drop for Handed {
    fn drop(&mut self) {
        // The sockets leave the sockhash as they close; their state and
        // flags go now, once the fence can no longer write the flags.
        self.fence.leave_kernel([self.client, self.server]);
        for c in [self.client, self.server] {
            delete(&self.k.state, &c);
            delete(&self.k.ctl, &c);
        }
    }
}

/// How often a session being taken back looks at the kernel's progress.
const POLL: Duration = Duration::from_millis(1);

/// What woke a kernel-mode session.
pub(crate) enum Woken {
    /// The fence fired.
    Fenced,
    /// A stream stopped in the kernel and its bytes wait in its socket:
    /// the client's once the view's deadline passed, the server's if it
    /// sent as the session entered the kernel.
    Passed,
    /// The client closed (or reset) its connection.
    ClientClosed,
    /// The server closed its connection.
    ServerClosed,
    /// A socket error.
    Error(crate::protocol::Side, io::Error),
}

/// Peeks one byte: `Ok(0)` at EOF; `WouldBlock` clears the readiness.
fn peek(s: &TcpStream) -> io::Result<usize> {
    s.try_io(Interest::READABLE, || {
        let mut b = [0u8; 1];
        // SAFETY: a writable one-byte buffer.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                b.as_mut_ptr() as *mut libc::c_void,
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

#[cfg(test)]
#[path = "kernel_tests.rs"]
mod tests;
