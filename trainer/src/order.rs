//! The seeded order in which training examples are visited: a new permutation each epoch, a
//! function of (seed, epoch) only, so that a resumed run continues at the same position.

use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

/// The training example at position `k` of the seeded order (a new shuffle each epoch).
pub struct EpochOrder {
    n: usize,
    seed: u64,
    epoch: usize,
    perm: Vec<usize>,
}

impl EpochOrder {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut o = Self {
            n,
            seed,
            epoch: usize::MAX,
            perm: Vec::new(),
        };
        o.shuffle(0);
        o
    }

    fn shuffle(&mut self, epoch: usize) {
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (epoch as u64).wrapping_mul(0x9E3779B97F4A7C15));
        self.perm = (0..self.n).collect();
        self.perm.shuffle(&mut rng);
        self.epoch = epoch;
    }

    /// The index of the example at position `k` (k counts examples since the start of training).
    pub fn at(&mut self, k: usize) -> usize {
        let epoch = k / self.n;
        if epoch != self.epoch {
            self.shuffle(epoch);
        }
        self.perm[k % self.n]
    }

    /// The indices at positions `start..start + len`.
    pub fn take(&mut self, start: usize, len: usize) -> Vec<usize> {
        (start..start + len).map(|k| self.at(k)).collect()
    }
}

/// A stable 64-bit fingerprint (FNV-1a) of a run's training data, stored in checkpoints so that
/// a resume on other data is caught. Feed it the tokenized examples in their stored order.
#[derive(Clone, Copy, Debug)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Self(0xcbf29ce484222325)
    }
}

impl Fingerprint {
    pub fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }

    pub fn tokens(&mut self, t: &[u32]) {
        for &x in t {
            self.bytes(&x.to_le_bytes());
        }
        // A separator, so that [1,2],[3] and [1],[2,3] differ.
        self.bytes(&[0xff, 0xfe]);
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_permutation_per_epoch_and_a_function_of_seed_and_position() {
        let mut a = EpochOrder::new(5, 3);
        let first: Vec<usize> = a.take(0, 5);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        let second = a.take(5, 5);
        assert_ne!(first, second, "a new shuffle each epoch");
        // Entering at position 7 (a resume) gives what the uninterrupted order gives there.
        let mut b = EpochOrder::new(5, 3);
        assert_eq!(b.at(7), second[2]);
        assert_eq!(b.at(2), first[2]);
    }

    #[test]
    fn fingerprint_separates_rows() {
        let (mut a, mut b) = (Fingerprint::default(), Fingerprint::default());
        a.tokens(&[1, 2]);
        a.tokens(&[3]);
        b.tokens(&[1]);
        b.tokens(&[2, 3]);
        assert_ne!(a.hex(), b.hex());
    }
}
