//! Cron schedules (croner syntax, IANA time zones) materialised as actor alarms.
//!
//! An actor that runs on a schedule calls [`crate::ActorContext::schedule_cron`] when it is
//! created and again at the end of each alarm run; the alarm's at-least-once delivery and retries
//! then apply to every occurrence.

use std::str::FromStr;

use chrono::TimeZone;

use crate::clock::UnixMs;
use crate::error::{Error, Result};

/// A parsed cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expr: String,
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl CronSchedule {
    /// Parses a 5-field (minute) or 6-field (second) cron expression, or an alias such as
    /// `@hourly`, in the IANA time zone `tz` (for example `Europe/Paris`, `UTC`).
    ///
    /// Errors: [`Error::Invalid`] naming the expression or time zone.
    pub fn parse(expr: &str, tz: &str) -> Result<Self> {
        let cron = croner::Cron::from_str(expr).map_err(|e| Error::Invalid {
            what: "cron expression",
            message: format!("{expr:?}: {e}"),
        })?;
        let tz = chrono_tz::Tz::from_str(tz).map_err(|_| Error::Invalid {
            what: "time zone",
            message: format!("{tz:?} is not an IANA time zone name"),
        })?;
        Ok(Self {
            expr: expr.to_owned(),
            cron,
            tz,
        })
    }

    /// The expression as given.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The time zone name.
    pub fn time_zone(&self) -> &str {
        self.tz.name()
    }

    /// First occurrence strictly after `after_ms`, ms since epoch.
    ///
    /// Errors: [`Error::Invalid`] when the schedule never fires again.
    pub fn next_after(&self, after_ms: UnixMs) -> Result<UnixMs> {
        let start = self
            .tz
            .timestamp_millis_opt(after_ms)
            .single()
            .ok_or_else(|| Error::Invalid {
                what: "time",
                message: format!("{after_ms} ms is out of range"),
            })?;
        let next = self
            .cron
            .find_next_occurrence(&start, false)
            .map_err(|e| Error::Invalid {
                what: "cron expression",
                message: format!("{:?} has no occurrence after {start}: {e}", self.expr),
            })?;
        Ok(next.timestamp_millis())
    }
}
