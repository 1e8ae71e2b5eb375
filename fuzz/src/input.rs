//! A cursor that turns fuzzer bytes into values. Reading past the end yields zeros, so
//! every input decodes to something and short inputs stay meaningful.

/// Consumes the fuzz input front to back.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps the fuzzer's bytes.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }
    /// True once every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }
    /// Everything not consumed yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}
