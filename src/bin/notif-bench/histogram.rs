//! Latency histogram: exact below 1,024 µs, then 512 sub-buckets per power of two
//! (0.2 % resolution), so recording is an increment and memory is fixed.

/// Counts of latencies in microseconds, and the largest seen.
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    pub max: u64,
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram { buckets: vec![0; 1024 + 54 * 512], count: 0, max: 0 }
    }
    fn index(us: u64) -> usize {
        if us < 1024 {
            return us as usize;
        }
        let e = 63 - us.leading_zeros() as usize; // >= 10
        1024 + (e - 10) * 512 + ((us >> (e - 9)) & 511) as usize
    }
    fn lower(idx: usize) -> u64 {
        if idx < 1024 {
            return idx as u64;
        }
        let e = (idx - 1024) / 512 + 10;
        let m = ((idx - 1024) % 512) as u64;
        (1u64 << e) + (m << (e - 9))
    }
    pub fn record_ns(&mut self, ns: u64) {
        let us = ns / 1000;
        let last = self.buckets.len() - 1;
        self.buckets[Self::index(us).min(last)] += 1;
        self.count += 1;
        self.max = self.max.max(us);
    }
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let want = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &b) in self.buckets.iter().enumerate() {
            seen += b;
            if seen >= want {
                return Self::lower(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::new();
        for us in 1..=1000u64 {
            h.record_ns(us * 1000);
        }
        assert_eq!(h.quantile(0.5), 500);
        assert_eq!(h.quantile(0.99), 990);
        h.record_ns(5_000_000_000);
        assert_eq!(h.max, 5_000_000);
        let big = Histogram::index(123_456);
        assert!(Histogram::lower(big) <= 123_456 && 123_456 - Histogram::lower(big) < 300);
    }
}
