//! The model gateway's domain: the provider catalog and routing ([`catalog`]), usage parsing
//! and pricing ([`usage`]), balances with the usage ledger ([`ledger`]), per-address and
//! per-minute limits ([`limits`]), organizations' policies ([`policy`]), and translation
//! between Chat Completions, Messages and Responses ([`translate`]). The HTTP proxy
//! that uses them lives in `kilocloud-server` (`api/gateway.rs`). Behaviour follows the
//! reference system §1 unless a doc comment says otherwise.

pub mod catalog;
pub mod config;
pub mod ledger;
pub mod limits;
pub mod policy;
pub mod translate;
pub mod usage;

pub use catalog::{Catalog, Route};
pub use config::GatewayConfig;
pub use ledger::{Counters, Ledger, Spend, UsageFilter, UsageRow};
pub use limits::{FreeLimits, FreeModelLimiter, Refusal, TokenWindow};
pub use policy::{CustomModel, OrgPolicy, Policies};
pub use translate::{StreamTranslator, TranslateError, Wire};
pub use usage::{SseUsageScanner, StreamFormat, Usage, count_tokens, estimated_input_tokens};
