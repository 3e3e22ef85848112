//! RFC 6962 Merkle tree hash (section 2.1), computed over a whole list.
//!
//! MTH({}) = SHA-256(), leaf = SHA-256(0x00 || d), node = SHA-256(0x01 ||
//! left || right), where the left subtree holds the largest power of two
//! smaller than n leaves.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// A hash from its hex form (either case), as `hex::decode` reads it, or
/// `None` when it is not 64 hex digits. The segment thread decodes every
/// record's hash for the Merkle leaves: a table lookup per digit into a
/// fixed array, where `hex::decode` matched each digit and allocated a
/// `Vec` per hash, took about a tenth of that thread's time.
pub fn decode_hash(hex: &str) -> Option<Hash> {
    /// Value of each byte as a hex digit; 0xff for a byte that is not one.
    const DIGITS: [u8; 256] = {
        let mut t = [0xffu8; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            t[b'A' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    let digits: &[u8; 64] = hex.as_bytes().try_into().ok()?;
    let mut out = [0u8; 32];
    // Any invalid digit sets the high bits of `bad`: one test at the end
    // instead of a branch per digit.
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (DIGITS[pair[0] as usize], DIGITS[pair[1] as usize]);
        bad |= hi | lo;
        *byte = (hi << 4) | (lo & 0x0f);
    }
    (bad & 0xf0 == 0).then_some(out)
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Merkle tree hash over already-hashed leaves.
pub fn root_from_leaf_hashes(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            // k = largest power of two strictly smaller than n.
            let k = if n.is_power_of_two() {
                n / 2
            } else {
                1 << (usize::BITS - 1 - n.leading_zeros())
            };
            node_hash(
                &root_from_leaf_hashes(&leaves[..k]),
                &root_from_leaf_hashes(&leaves[k..]),
            )
        }
    }
}

/// Merkle tree hash over raw leaf data: the recursive definition, kept as
/// the reference the frontier is tested against.
#[cfg(test)]
pub fn root<D: AsRef<[u8]>>(items: &[D]) -> Hash {
    let leaves: Vec<Hash> = items.iter().map(|d| leaf_hash(d.as_ref())).collect();
    root_from_leaf_hashes(&leaves)
}

/// The right edge of a growing tree: the roots of its perfect subtrees,
/// largest first. Appending is amortised O(1) and the root of everything
/// so far is O(log n), so a manifest of millions of lines can be signed
/// every few seconds and verified in one pass.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    peaks: Vec<(Hash, u64)>,
    size: u64,
}

impl Frontier {
    pub fn push(&mut self, leaf_hash: Hash) {
        let mut node = (leaf_hash, 1u64);
        while let Some(&(left, n)) = self.peaks.last() {
            if n != node.1 {
                break;
            }
            self.peaks.pop();
            node = (node_hash(&left, &node.0), n * 2);
        }
        self.peaks.push(node);
        self.size += 1;
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// MTH of the leaves pushed so far: the peaks folded right to left,
    /// which is exactly RFC 6962's split at the largest power of two.
    pub fn root(&self) -> Hash {
        let mut it = self.peaks.iter().rev();
        let Some(&(mut acc, _)) = it.next() else {
            return Sha256::digest([]).into();
        };
        for (left, _) in it {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_hash_reads_what_hex_decode_reads() {
        let lower = "00ff10a9b8c7d6e5f4032132435465768798a9bacbdcedfe0f1e2d3c4b5a6978";
        let cases = [
            lower.to_string(),
            lower.to_uppercase(),
            "0".repeat(64),
            // Wrong length, odd length, a non-hex digit in each position.
            lower[..62].to_string(),
            lower[..63].to_string(),
            format!("{lower}00"),
            String::new(),
            format!("g{}", &lower[1..]),
            format!("{}g", &lower[..63]),
            format!("{}:{}", &lower[..30], &lower[31..]),
            format!("{}/{}", &lower[..30], &lower[31..]),
            format!("{}G{}", &lower[..30], &lower[31..]),
            // Multi-byte UTF-8 of the right byte length.
            format!("é{}", &lower[2..]),
        ];
        for c in cases {
            let want: Option<Hash> = hex::decode(&c).ok().and_then(|v| v.try_into().ok());
            assert_eq!(decode_hash(&c), want, "{c:?}");
        }
        for b in 0..=255u8 {
            let c = format!("{}{}", b as char, &lower[1..]);
            let want: Option<Hash> = hex::decode(&c).ok().and_then(|v| v.try_into().ok());
            assert_eq!(decode_hash(&c), want, "first byte {b}");
        }
    }

    #[test]
    fn frontier_root_equals_recursive_root_for_every_size() {
        let items: Vec<Vec<u8>> = (0u32..70).map(|i| i.to_le_bytes().to_vec()).collect();
        let mut f = Frontier::default();
        assert_eq!(f.root(), root::<Vec<u8>>(&[]));
        for n in 1..=items.len() {
            f.push(leaf_hash(&items[n - 1]));
            assert_eq!(f.root(), root(&items[..n]), "size {n}");
            assert_eq!(f.size(), n as u64);
        }
    }

    // Test vectors from the certificate-transparency-go merkle tests
    // (inputs 0x, 0x00, 0x10, 0x2021, 0x3031, 0x40414243, ...).
    fn inputs() -> Vec<Vec<u8>> {
        vec![
            vec![],
            vec![0x00],
            vec![0x10],
            vec![0x20, 0x21],
            vec![0x30, 0x31],
            vec![0x40, 0x41, 0x42, 0x43],
            vec![0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            vec![
                0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d,
                0x6e, 0x6f,
            ],
        ]
    }

    #[test]
    fn rfc6962_roots_match_reference_vectors() {
        let expected = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let all = inputs();
        for (n, want) in expected.iter().enumerate() {
            assert_eq!(
                hex::encode(root(&all[..n + 1])),
                *want,
                "tree of {} leaves",
                n + 1
            );
        }
        assert_eq!(
            hex::encode(root::<Vec<u8>>(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
