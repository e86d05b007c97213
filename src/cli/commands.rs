//! The client subcommands.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};

use super::{ClientArgs, Connection, Failure};

/// Prints a line; a closed pipe (`| head`) ends the command quietly, with success.
macro_rules! say {
    ($($arg:tt)*) => {
        super::emit(&format!($($arg)*))?
    };
}
use crate::proto;
use crate::proto::action_service_client::ActionServiceClient;
use crate::proto::attribute_value::Value as V;
use crate::proto::event_service_client::EventServiceClient;
use crate::proto::query_service_client::QueryServiceClient;
use crate::proto::trigger_service_client::TriggerServiceClient;

/// The client subcommands of `engage`.
#[derive(Subcommand, Debug, Clone)]
pub enum ClientCommand {
    /// Tracks an event: `engage track USER EVENT [name=value ...]`. Values are sent as text and
    /// typed by the server by the attribute's definition ("39" is 39 for a NUMBER attribute;
    /// an attribute not defined yet is created as STRING and keeps the text as written).
    Track {
        user: String,
        event: String,
        /// Attributes, `name=value`.
        attributes: Vec<String>,
        /// The event's idempotency key (a retry with the same id stores nothing).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A user's timeline, newest first.
    Timeline {
        user: String,
        /// Only events of this name.
        #[arg(long)]
        name: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lists, reads, creates, pauses, resumes and deletes triggers.
    Triggers {
        #[command(subcommand)]
        action: TriggersAction,
    },
    /// Follows fired actions as they fire (with --consumer, from its acknowledged position,
    /// acknowledging each action once printed).
    Tail {
        /// A named consumer: resumes where it left off, acknowledges what it printed.
        #[arg(long)]
        consumer: Option<String>,
        /// Where to start: the log's end, its start, or (with --consumer) its position.
        #[arg(long, value_enum)]
        from: Option<StartFrom>,
        /// Stop after this many actions (0: follow until interrupted).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Statistics of an event, drawn in the terminal: `engage stats product_purchased --last 24h`.
    Stats {
        event: String,
        /// The range, ending now: 90m, 24h, 30d, ...
        #[arg(long, default_value = "24h")]
        last: String,
        /// Bucket size.
        #[arg(long, value_enum, default_value_t = By::Hour)]
        by: By,
        #[arg(long, value_enum, default_value_t = Aggregate::Count)]
        aggregate: Aggregate,
        /// The NUMBER attribute of sum, min, max, avg.
        #[arg(long)]
        attribute: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Users matching a filter (a file with the JSON of a Condition), with their count.
    Users {
        #[arg(long)]
        filter: PathBuf,
        /// At most this many user ids.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Erases a user everywhere (right to erasure).
    Erase {
        user: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `engage triggers ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum TriggersAction {
    /// Every trigger, in creation order.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// One trigger.
    Get {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Creates a trigger from a file with its JSON (`-` for standard input).
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Pauses a trigger (it fires nothing; pending timers are cancelled).
    Pause {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resumes a paused trigger.
    Resume {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deletes a trigger.
    Delete {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum StartFrom {
    Latest,
    Earliest,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum By {
    Minute,
    Hour,
    Day,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Aggregate {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    DistinctUsers,
}

impl ClientCommand {
    /// The connection flags of the command.
    pub fn client(&self) -> &ClientArgs {
        match self {
            ClientCommand::Track { client, .. }
            | ClientCommand::Timeline { client, .. }
            | ClientCommand::Tail { client, .. }
            | ClientCommand::Stats { client, .. }
            | ClientCommand::Users { client, .. }
            | ClientCommand::Erase { client, .. } => client,
            ClientCommand::Triggers { action } => match action {
                TriggersAction::List { client }
                | TriggersAction::Get { client, .. }
                | TriggersAction::Create { client, .. }
                | TriggersAction::Pause { client, .. }
                | TriggersAction::Resume { client, .. }
                | TriggersAction::Delete { client, .. } => client,
            },
        }
    }
}

/// An attribute value from the command line, as text (see `ClientCommand::Track`): sent as
/// a number, `02134` would be stored as "2134" by a STRING attribute.
fn value_of(text: &str) -> proto::AttributeValue {
    proto::AttributeValue {
        value: Some(V::StringValue(text.to_string())),
    }
}

/// A value as people read it: numbers canonical, strings quoted, dates RFC 3339.
fn text_of(v: &proto::AttributeValue) -> String {
    match &v.value {
        Some(V::StringValue(s)) => format!("{s:?}"),
        Some(V::NumberValue(n)) => crate::domain::typing::number_text(*n),
        Some(V::BoolValue(b)) => b.to_string(),
        Some(V::DateValue(t)) => time_of(Some(t)),
        Some(V::JsonValue(j)) => j.clone(),
        None => String::new(),
    }
}

fn time_of(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| jiff::Timestamp::new(t.seconds, t.nanos).ok())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// `90m`, `24h`, `30d`, `45s` in seconds.
fn seconds_of(text: &str) -> Result<i64, Failure> {
    let bad = || {
        Failure::usage(format!(
            "--last {text:?}: a number and a unit (s, m, h or d), like 24h"
        ))
    };
    // The unit is the last character (whatever its width: no split inside a character).
    let at = text.char_indices().last().map_or(0, |(i, _)| i);
    let (digits, unit) = text.split_at(at);
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if n <= 0 {
        return Err(bad());
    }
    n.checked_mul(unit).ok_or_else(bad)
}

fn read_file(path: &PathBuf) -> Result<String, Failure> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| Failure::usage(format!("standard input: {e}")))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| Failure::usage(format!("{}: {e}", path.display())))
}

fn now() -> prost_types::Timestamp {
    let now = jiff::Timestamp::now();
    prost_types::Timestamp {
        seconds: now.as_second(),
        nanos: now.subsec_nanosecond(),
    }
}

pub(super) async fn run(c: &Connection, command: ClientCommand) -> Result<(), Failure> {
    match command {
        ClientCommand::Track {
            user,
            event,
            attributes,
            id,
            ..
        } => {
            let mut attrs = HashMap::new();
            for a in &attributes {
                let (name, value) = a
                    .split_once('=')
                    .ok_or_else(|| Failure::usage(format!("{a:?}: attributes are name=value")))?;
                attrs.insert(name.to_string(), value_of(value));
            }
            let e = proto::Event {
                event_id: id.unwrap_or_default(),
                user_id: user,
                name: event,
                attributes: attrs,
                ..Default::default()
            };
            let answer = EventServiceClient::new(c.channel.clone())
                .track_event(c.request(proto::TrackEventRequest { event: Some(e) }))
                .await?
                .into_inner();
            if c.json {
                say!("{}", c.to_json("engage.v1.TrackEventResponse", &answer));
            } else if answer.duplicate {
                say!(
                    "duplicate of event {} (#{}), nothing stored",
                    answer.event_id,
                    answer.sequence
                );
            } else {
                say!(
                    "stored event {} (#{}), {} action(s) fired",
                    answer.event_id,
                    answer.sequence,
                    answer.actions_fired
                );
            }
        }
        ClientCommand::Timeline {
            user, name, limit, ..
        } => {
            let mut client = EventServiceClient::new(c.channel.clone());
            let mut token = String::new();
            let mut shown = 0;
            while shown < limit {
                let page = client
                    .get_user_timeline(c.request(proto::GetUserTimelineRequest {
                        user_id: user.clone(),
                        event_name: name.clone().unwrap_or_default(),
                        page_size: (limit - shown).min(1000) as u32,
                        page_token: token,
                        ..Default::default()
                    }))
                    .await?
                    .into_inner();
                for e in &page.events {
                    if c.json {
                        say!("{}", c.to_json("engage.v1.Event", e));
                    } else {
                        let mut attrs: Vec<String> = e
                            .attributes
                            .iter()
                            .map(|(k, v)| format!("{k}={}", text_of(v)))
                            .collect();
                        attrs.sort();
                        say!(
                            "{}  {}  {}",
                            time_of(e.occurred_at.as_ref()),
                            e.name,
                            attrs.join(" ")
                        );
                    }
                }
                shown += page.events.len();
                if page.next_page_token.is_empty() || page.events.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if shown == 0 && !c.json {
                say!("no events");
            }
        }
        ClientCommand::Triggers { action } => triggers(c, action).await?,
        ClientCommand::Tail {
            consumer,
            from,
            limit,
            ..
        } => tail(c, consumer, from, limit).await?,
        ClientCommand::Stats {
            event,
            last,
            by,
            aggregate,
            attribute,
            ..
        } => {
            let secs = seconds_of(&last)?;
            let to = now();
            let from = prost_types::Timestamp {
                seconds: to
                    .seconds
                    .checked_sub(secs)
                    .ok_or_else(|| Failure::usage(format!("--last {last:?}: too long")))?,
                nanos: to.nanos,
            };
            // The server covers the partial buckets at both ends.
            let granularity = match by {
                By::Minute => proto::Granularity::Minute,
                By::Hour => proto::Granularity::Hour,
                By::Day => proto::Granularity::Day,
            };
            let aggregate = match aggregate {
                Aggregate::Count => proto::Aggregate::Count,
                Aggregate::Sum => proto::Aggregate::Sum,
                Aggregate::Min => proto::Aggregate::Min,
                Aggregate::Max => proto::Aggregate::Max,
                Aggregate::Avg => proto::Aggregate::Avg,
                Aggregate::DistinctUsers => proto::Aggregate::DistinctUsers,
            };
            let answer = QueryServiceClient::new(c.channel.clone())
                .get_event_stats(c.request(proto::GetEventStatsRequest {
                    event_name: event.clone(),
                    from: Some(from),
                    to: Some(to),
                    granularity: granularity as i32,
                    aggregate: aggregate as i32,
                    attribute: attribute.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            if c.json {
                say!("{}", c.to_json("engage.v1.GetEventStatsResponse", &answer));
            } else {
                say!("{}", chart(&event, &answer, by).trim_end());
            }
        }
        ClientCommand::Users { filter, limit, .. } => {
            if limit == 0 {
                return Err(Failure::usage("--limit: at least 1"));
            }
            let text = read_file(&filter)?;
            let condition: proto::Condition = c.parse_json("engage.v1.Condition", &text).map_err(|e| {
                Failure::usage(format!("{}: not the JSON of a Condition: {e}", filter.display()))
            })?;
            let mut client = QueryServiceClient::new(c.channel.clone());
            let mut token = String::new();
            let mut shown = 0;
            loop {
                let page = client
                    .filter_users(c.request(proto::FilterUsersRequest {
                        filter: Some(condition.clone()),
                        page_size: (limit - shown).clamp(1, 1000) as u32,
                        page_token: token,
                        ..Default::default()
                    }))
                    .await?
                    .into_inner();
                if shown == 0 && !c.json {
                    say!("{} users match", page.total_count);
                }
                if c.json {
                    say!("{}", c.to_json("engage.v1.FilterUsersResponse", &page));
                } else {
                    for u in &page.user_ids {
                        say!("{u}");
                    }
                }
                shown += page.user_ids.len();
                if page.next_page_token.is_empty() || shown >= limit || page.user_ids.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        ClientCommand::Erase { user, .. } => {
            let answer = EventServiceClient::new(c.channel.clone())
                .delete_user(c.request(proto::DeleteUserRequest {
                    user_id: user.clone(),
                }))
                .await?
                .into_inner();
            if c.json {
                say!("{}", c.to_json("engage.v1.DeleteUserResponse", &answer));
            } else {
                say!("erased {} events of {user:?}", answer.events_deleted);
            }
        }
    }
    Ok(())
}

/// The buckets as horizontal bars, with the numbers beside them, and the total.
fn chart(event: &str, answer: &proto::GetEventStatsResponse, by: By) -> String {
    const WIDTH: f64 = 40.0;
    let max = answer.buckets.iter().map(|b| b.value).fold(0.0f64, f64::max);
    let mut out = format!("{event}\n");
    for b in &answer.buckets {
        let start = time_of(b.start.as_ref());
        let label = match by {
            By::Day => start.get(..10).unwrap_or(&start).to_string(),
            _ => start.get(..16).unwrap_or(&start).replace('T', " "),
        };
        let cells = if max > 0.0 {
            (b.value / max * WIDTH).round() as usize
        } else {
            0
        };
        let bar: String = "█".repeat(cells);
        out.push_str(&format!(
            "{label}  {bar:<w$} {}\n",
            crate::domain::typing::number_text(b.value),
            w = WIDTH as usize
        ));
    }
    out.push_str(&format!(
        "total {}\n",
        crate::domain::typing::number_text(answer.total)
    ));
    out
}

async fn triggers(c: &Connection, action: TriggersAction) -> Result<(), Failure> {
    let mut client = TriggerServiceClient::new(c.channel.clone());
    let show = |t: &proto::Trigger| -> Result<(), Failure> {
        if c.json {
            say!("{}", c.to_json("engage.v1.Trigger", t));
        } else {
            let action = t.action.as_ref();
            say!(
                "{}  {:?}  on {}  -> {}{}{}",
                t.id,
                t.name,
                t.event_name,
                action.map_or("", |a| a.r#type.as_str()),
                action
                    .filter(|a| !a.destination_id.is_empty())
                    .map_or(String::new(), |a| format!(" (destination {})", a.destination_id)),
                if t.paused { "  [paused]" } else { "" }
            );
        }
        Ok(())
    };
    let pausing = matches!(action, TriggersAction::Pause { .. });
    match action {
        TriggersAction::List { .. } => {
            let mut token = String::new();
            let mut any = false;
            loop {
                let page = client
                    .list_triggers(c.request(proto::ListTriggersRequest {
                        page_size: 1000,
                        page_token: token,
                        ..Default::default()
                    }))
                    .await?
                    .into_inner();
                for t in &page.triggers {
                    show(t)?;
                    any = true;
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            if !any && !c.json {
                say!("no triggers");
            }
        }
        TriggersAction::Get { id, .. } => {
            let t = client
                .get_trigger(c.request(proto::GetTriggerRequest { id }))
                .await?
                .into_inner();
            if c.json {
                show(&t)?;
            } else {
                // Every field, as the API has it.
                let json: serde_json::Value =
                    serde_json::from_str(&c.to_json("engage.v1.Trigger", &t)).unwrap_or_default();
                say!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
            }
        }
        TriggersAction::Create { file, .. } => {
            let text = read_file(&file)?;
            let t: proto::Trigger = c
                .parse_json("engage.v1.Trigger", &text)
                .map_err(|e| Failure::usage(format!("{}: not the JSON of a Trigger: {e}", file.display())))?;
            let created = client
                .create_trigger(c.request(proto::CreateTriggerRequest { trigger: Some(t) }))
                .await?
                .into_inner();
            if c.json {
                show(&created)?;
            } else {
                say!("created trigger {} ({:?})", created.id, created.name);
            }
        }
        TriggersAction::Pause { id, .. } | TriggersAction::Resume { id, .. } => {
            let paused = pausing;
            let mut t = client
                .get_trigger(c.request(proto::GetTriggerRequest { id }))
                .await?
                .into_inner();
            let word = if paused { "paused" } else { "running" };
            if t.paused == paused {
                // No update: an update would cancel the trigger's pending timers.
                if c.json {
                    show(&t)?;
                } else {
                    say!("trigger {} ({:?}) is already {word}", t.id, t.name);
                }
                return Ok(());
            }
            t.paused = paused;
            let t = client
                .update_trigger(c.request(proto::UpdateTriggerRequest { trigger: Some(t) }))
                .await?
                .into_inner();
            if c.json {
                show(&t)?;
            } else {
                say!(
                    "{} trigger {} ({:?})",
                    if paused { "paused" } else { "resumed" },
                    t.id,
                    t.name
                );
            }
        }
        TriggersAction::Delete { id, .. } => {
            client
                .delete_trigger(c.request(proto::DeleteTriggerRequest { id: id.clone() }))
                .await?;
            if c.json {
                say!("{}", serde_json::json!({ "deleted": id }));
            } else {
                say!("deleted trigger {id}");
            }
        }
    }
    Ok(())
}

async fn tail(
    c: &Connection,
    consumer: Option<String>,
    from: Option<StartFrom>,
    limit: u64,
) -> Result<(), Failure> {
    let mut client = ActionServiceClient::new(c.channel.clone());
    let start = match from {
        Some(StartFrom::Latest) => proto::StartFrom::Latest,
        Some(StartFrom::Earliest) => proto::StartFrom::Earliest,
        None => proto::StartFrom::Unspecified,
    };
    let mut stream = client
        .subscribe_actions(c.request(proto::SubscribeActionsRequest {
            consumer: consumer.clone().unwrap_or_default(),
            start: start as i32,
            ..Default::default()
        }))
        .await?
        .into_inner();
    let mut seen = 0;
    while let Some(a) = stream.message().await? {
        if c.json {
            say!("{}", c.to_json("engage.v1.FiredAction", &a));
        } else {
            say!(
                "#{}  {}  {:?}  {}  user {:?}  {}",
                a.sequence,
                time_of(a.fired_at.as_ref()),
                a.trigger_name,
                a.r#type,
                a.user_id,
                a.payload
            );
        }
        if let Some(name) = &consumer {
            client
                .ack_actions(c.request(proto::AckActionsRequest {
                    consumer: name.clone(),
                    up_to_sequence: a.sequence,
                }))
                .await?;
        }
        seen += 1;
        if limit > 0 && seen >= limit {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_a_number_and_a_unit() {
        assert_eq!(seconds_of("90m").ok(), Some(5400));
        assert_eq!(seconds_of("24h").ok(), Some(86_400));
        assert_eq!(seconds_of("30d").ok(), Some(2_592_000));
        for bad in [
            "",
            "h",
            "0h",
            "-5h",
            "5x",
            "24ч",
            "ч",
            "99999999999999999999d",
            "9223372036854775807d",
        ] {
            assert!(seconds_of(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_are_sent_as_written() {
        assert_eq!(value_of("02134").value, Some(V::StringValue("02134".into())));
    }
}
