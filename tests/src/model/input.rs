//! Where the model's operations come from: a `Source` of bytes — a fuzzer's input (`Bytes`,
//! zeros once exhausted) or a seeded generator (`Rng`, xorshift64*, never exhausted) — and the
//! biased draws the operations are decoded with.
//!
//! Invariant: every draw is a pure function of the bytes consumed, so a seed (or an input file)
//! replays exactly. The draws deliberately over-produce the values a uniform generator almost
//! never yields: zero lengths, unaligned offsets and lengths, ranges ending exactly at a
//! boundary, and values near `u64::MAX` whose sums overflow.

use vmo::PAGE_SIZE;

const P: u64 = PAGE_SIZE;

/// A stream of bytes.
pub trait Source {
    fn byte(&mut self) -> u8;
    /// No more real input (a fuzzer's input is used up); generators never are.
    fn exhausted(&self) -> bool;

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        u64::from_le_bytes(b)
    }
    /// `0..n` (n ≥ 1).
    fn pick(&mut self, n: usize) -> usize {
        if n <= 256 {
            self.byte() as usize % n
        } else {
            self.u16() as usize % n
        }
    }
    fn bool(&mut self) -> bool {
        self.byte() & 1 == 1
    }

    /// An offset into something `span` bytes long, biased towards the interesting ones.
    fn offset(&mut self, span: u64) -> u64 {
        let pages = span / P + 2;
        match self.byte() % 10 {
            0 => 0,
            1..=4 => (self.byte() as u64 % pages) * P,
            5 => (self.byte() as u64 % pages) * P + 1 + self.u16() as u64 % (P - 1),
            6 => span.saturating_sub(P),
            7 => span,
            8 => u64::MAX - (self.byte() as u64) * P - (self.byte() as u64 % 2) * 0xfff,
            _ => (self.byte() as u64 % pages) * P + P - 1,
        }
    }

    /// A length for a range inside something `span` bytes long, biased likewise.
    fn length(&mut self, span: u64) -> u64 {
        match self.byte() % 12 {
            0 => 0,
            1..=3 => P * (1 + self.byte() as u64 % 4),
            4 => 1 + self.u16() as u64 % (3 * P),
            5 => span,
            6 => P * (1 + self.byte() as u64 % (span / P + 1)),
            7 => u64::MAX - self.byte() as u64,
            8 => 1,
            9 => P - 1 + (self.byte() as u64 % 3),
            _ => P * (1 + self.byte() as u64 % 2),
        }
    }

    /// A byte-access length: small, sometimes crossing a page, sometimes zero.
    fn io_len(&mut self) -> usize {
        match self.byte() % 8 {
            0 => 0,
            1 => P as usize,
            2 => 1 + self.u16() as usize % (2 * P as usize + 1),
            _ => 1 + self.byte() as usize % 64,
        }
    }
}

/// A fuzzer's input; reads as zeros past its end.
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }
}

impl Source for Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// A seeded xorshift64* generator.
pub struct Rng {
    state: u64,
    buf: u64,
    left: u32,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            buf: 0,
            left: 0,
        }
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Source for Rng {
    fn byte(&mut self) -> u8 {
        if self.left == 0 {
            self.buf = self.next_u64();
            self.left = 8;
        }
        let b = self.buf as u8;
        self.buf >>= 8;
        self.left -= 1;
        b
    }
    fn exhausted(&self) -> bool {
        false
    }
}
