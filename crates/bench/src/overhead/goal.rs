//! The gateway's figures of one run set against the overhead goal (issue 15), printed last: CPU per
//! request at most 1.3x nginx's and throughput at least 0.9x at each concurrency, no errors, stream time
//! to first byte p50 at most nginx's, and RSS under 200 MB with the open streams.

use super::ms;
use std::time::Duration;

/// Most CPU per request, as a multiple of nginx's of the same round.
const MAX_CPU: f64 = 1.3;
/// Least throughput, as a multiple of nginx's of the same round.
const MIN_RPS: f64 = 0.9;
/// Most RSS with [`GOAL_OPEN_STREAMS`] streams held open.
const MAX_OPEN_RSS_MB: f64 = 200.0;
/// The open streams the memory bar is set for; with fewer the RSS is only reported.
const GOAL_OPEN_STREAMS: usize = 10_000;

/// What the phases measured of the gateway (and of nginx where the goal is relative to it).
#[derive(Default)]
pub struct Goal {
    /// Per concurrency: the medians over the rounds of the gateway's CPU per request and throughput,
    /// each as a ratio to nginx's in the same round.
    pub levels: Vec<(usize, f64, f64)>,
    /// Failed gateway requests, streamed or not.
    pub errors: u64,
    /// Stream TTFB p50 of the gateway and of nginx: the median of the rounds' p50s, and the p50 of
    /// every round's streams together.
    pub ttfb: Option<Ttfb>,
    /// RSS idle, in MB.
    pub idle_mb: Option<f64>,
    /// RSS with the open streams, in MB; how many opened, of how many asked.
    pub open: Option<(f64, usize, usize)>,
}

/// Stream time to first byte p50, as [`Goal::ttfb`] keeps it.
pub struct Ttfb {
    pub gateway_rounds: Duration,
    pub nginx_rounds: Duration,
    pub gateway_all: Duration,
    pub nginx_all: Duration,
}

/// One line of the goal's table: the bar, what it asks, what the gateway did, and whether it is met
/// (`None` for a figure only reported).
pub type Row = (String, String, String, Option<bool>);

impl Goal {
    /// The table's lines, in the goal's order.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for &(conc, cpu, rps) in &self.levels {
            rows.push((
                format!("CPU per request, {conc} connections"),
                format!("≤ {MAX_CPU:.2}x nginx's"),
                format!("{cpu:.2}x"),
                Some(cpu <= MAX_CPU),
            ));
            rows.push((
                format!("throughput, {conc} connections"),
                format!("≥ {MIN_RPS:.2}x nginx's"),
                format!("{rps:.2}x"),
                Some(rps >= MIN_RPS),
            ));
        }
        rows.push(("errors".into(), "0".into(), self.errors.to_string(), Some(self.errors == 0)));
        if let Some(t) = &self.ttfb {
            for (what, gateway, nginx) in [
                ("median of the rounds", t.gateway_rounds, t.nginx_rounds),
                ("all streams together", t.gateway_all, t.nginx_all),
            ] {
                rows.push((
                    format!("stream TTFB p50, {what}"),
                    format!("≤ nginx's {}", ms(nginx)),
                    ms(gateway),
                    Some(gateway <= nginx),
                ));
            }
        }
        if let Some(idle) = self.idle_mb {
            rows.push(("RSS idle".into(), "reported".into(), format!("{idle:.1} MB"), None));
        }
        if let Some((mb, open, asked)) = self.open {
            let measured = if open < asked {
                format!("{mb:.1} MB, only {open} of {asked} streams open")
            } else {
                format!("{mb:.1} MB")
            };
            let (goal, met) = if asked >= GOAL_OPEN_STREAMS {
                (format!("< {MAX_OPEN_RSS_MB:.0} MB"), Some(open == asked && mb < MAX_OPEN_RSS_MB))
            } else {
                (format!("reported (the bar is for {GOAL_OPEN_STREAMS})"), None)
            };
            rows.push((format!("RSS with {asked} open streams"), goal, measured, met));
        }
        rows
    }

    /// Prints the table.
    pub fn print(&self) {
        println!("\ngoal (issue 15): the gateway beside nginx in this run");
        println!("| bar | goal | gateway | met |");
        println!("|---|---|---|---|");
        for (bar, goal, measured, met) in self.rows() {
            let met = match met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            println!("| {bar} | {goal} | {measured} | {met} |");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn met(goal: &Goal) -> Vec<(String, Option<bool>)> {
        goal.rows().into_iter().map(|(bar, _, _, met)| (bar, met)).collect()
    }

    #[test]
    fn each_bar_is_judged_on_its_own_figure() {
        let goal = Goal {
            levels: vec![(16, 1.29, 0.91), (64, 1.31, 0.89)],
            errors: 0,
            ttfb: Some(Ttfb {
                gateway_rounds: Duration::from_micros(920),
                nginx_rounds: Duration::from_micros(920),
                gateway_all: Duration::from_micros(930),
                nginx_all: Duration::from_micros(920),
            }),
            idle_mb: Some(10.4),
            open: Some((192.3, 10_000, 10_000)),
        };
        let s = |bar: &str, m: Option<bool>| (bar.to_string(), m);
        assert_eq!(
            met(&goal),
            [
                s("CPU per request, 16 connections", Some(true)),
                s("throughput, 16 connections", Some(true)),
                s("CPU per request, 64 connections", Some(false)),
                s("throughput, 64 connections", Some(false)),
                s("errors", Some(true)),
                s("stream TTFB p50, median of the rounds", Some(true)),
                s("stream TTFB p50, all streams together", Some(false)),
                s("RSS idle", None),
                s("RSS with 10000 open streams", Some(true)),
            ]
        );
    }

    #[test]
    fn errors_and_streams_that_did_not_open_fail_their_bars() {
        let goal = Goal { errors: 3, open: Some((150.0, 9_000, 10_000)), ..Goal::default() };
        assert_eq!(
            met(&goal),
            [("errors".to_string(), Some(false)), ("RSS with 10000 open streams".to_string(), Some(false))]
        );
        assert!(goal.rows()[1].2.contains("only 9000 of 10000"), "{:?}", goal.rows()[1]);
        let fewer = Goal { open: Some((20.0, 200, 200)), ..Goal::default() };
        assert_eq!(fewer.rows()[1].3, None, "a small run only reports its RSS");
    }
}
