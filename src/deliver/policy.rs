//! Which answers are worth another attempt, and how long to wait before it.

use std::time::Duration;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Worth trying again: no answer, 408, 429 or 5xx. `after` is the destination's
    /// `Retry-After`, when it gave one.
    Retry {
        status: u16,
        error: String,
        after: Option<Duration>,
    },
    /// Another attempt would get the same answer (other 4xx, a redirect, a bad request).
    Fatal {
        status: u16,
        error: String,
    },
}

/// Classifies an HTTP answer.
pub fn classify(status: u16, retry_after: Option<&str>) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        408 | 429 | 500..=599 => Outcome::Retry {
            status,
            error: format!("HTTP {status}"),
            after: retry_after.and_then(parse_retry_after),
        },
        _ => Outcome::Fatal {
            status,
            error: format!("HTTP {status}"),
        },
    }
}

/// `Retry-After` in seconds; the HTTP-date form is honoured through the destination's clock
/// only when it parses, else ignored in favour of the backoff.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate(v)?;
    let now = std::time::SystemTime::now();
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses the IMF-fixdate form (`Sun, 06 Nov 1994 08:49:37 GMT`), the one servers send.
fn httpdate(s: &str) -> Option<std::time::SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as u64
        + 1;
    let year: u64 = parts[3].parse().ok()?;
    let hms: Vec<u64> = parts[4].split(':').filter_map(|p| p.parse().ok()).collect();
    if hms.len() != 3 || year < 1970 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2];
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The longest `Retry-After` honoured when it is above the destination's own `backoff_max`: a
/// destination asking for more is tried again after this long.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// Exponential backoff with full jitter: a random wait in `[0, min(max, base·2^n)]`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Result<Backoff, String> {
        if base.is_zero() || max < base {
            return Err("backoff needs 0 < base <= max".into());
        }
        Ok(Backoff { base, max })
    }

    /// The wait before attempt `attempts + 1`, after `attempts` failures.
    pub fn delay(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempts.min(20))
            .min(self.max);
        let jittered = Duration::from_millis(fastrand::u64(0..=ceiling.as_millis() as u64));
        match retry_after {
            // The destination said when: wait that long even past `max` (trying sooner only
            // burns attempts on answers like 429), up to an hour or `max` if that is longer.
            Some(after) => after
                .min(RETRY_AFTER_CAP.max(self.max))
                .max(jittered.min(self.base)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(classify(204, None), Outcome::Delivered);
        for s in [408, 429, 500, 502, 503] {
            assert!(matches!(classify(s, None), Outcome::Retry { .. }), "{s}");
        }
        for s in [301, 400, 401, 404, 410] {
            assert!(matches!(classify(s, None), Outcome::Fatal { .. }), "{s}");
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(
            httpdate("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(std::time::UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        for attempts in 0..40 {
            let d = b.delay(attempts, None);
            let ceiling =
                Duration::from_millis(100 * (1u64 << attempts.min(20))).min(Duration::from_secs(1));
            assert!(d <= ceiling, "{attempts}: {d:?}");
        }
        assert_eq!(
            b.delay(0, Some(Duration::from_secs(60))),
            Duration::from_secs(60)
        );
        assert_eq!(
            b.delay(0, Some(Duration::from_secs(86_400))),
            RETRY_AFTER_CAP
        );
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
    }
}
