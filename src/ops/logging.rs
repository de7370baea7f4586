//! Log setup: tracing to stderr, levels from `[log]` and `RUST_LOG`, as
//! text or (`log.format = "json"`) one JSON object per line.
//!
//! Under systemd (`JOURNAL_STREAM` set) the journal adds the time, so lines
//! carry none and no colours; each line starts with its syslog priority in
//! the sd-daemon form (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug),
//! which journald strips and records, so `journalctl -p warning -u edgeferry`
//! shows only what needs a look.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogConfig, LogFormat};

/// Install the global subscriber (once, in the binary).
pub fn init(log: &LogConfig) {
    let default = format!("{},rumqttd={}", log.level, log.broker);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log.format == LogFormat::Json {
        // The journal adds its own time, but a shipper reading the lines
        // wants one: kept. Under journald the priority prefix still goes
        // first (journald strips it, leaving the object).
        let format = tracing_subscriber::fmt::format()
            .json()
            .flatten_event(false)
            .with_current_span(false)
            .with_span_list(false);
        let builder = builder.json().with_ansi(false);
        if under_journald() {
            builder.event_format(Priority(format)).init();
        } else {
            builder.event_format(format).init();
        }
        return;
    }
    if under_journald() {
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_target(false)
            .with_ansi(false);
        builder.event_format(Priority(format)).init();
    } else {
        // Colour only on a terminal: a log file or pipe gets plain text.
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        builder.with_target(false).with_ansi(tty).init();
    }
}

/// Whether stderr goes to the journal.
pub fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// The sd-daemon priority prefix of a level.
pub fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        _ => "<7>",
    }
}

/// Prefixes each line of the inner format with its priority.
struct Priority<F>(F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writer.write_str(priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}
