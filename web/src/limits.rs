//! The web server's memory bounds. Everything it holds per request is bounded here; answers
//! (streams included) are passed on frame by frame and never gathered, so they add only
//! the HTTP/2 flow-control windows of the channels to the backends.

use std::time::Duration;

/// The largest request body of a call, as the browser sends it (a gRPC-web frame, base64 in
/// `application/grpc-web-text`), except the intercept service's.
pub const MAX_BODY: usize = 1 << 20;
/// The largest request body of an intercept call: a forwarded packet's replacement may be
/// 4 MiB (`intercept_svc::MAX_REPLACEMENT`), base64 in text mode, plus its envelope.
pub const MAX_INTERCEPT_BODY: usize = 12 << 20;
/// The request bodies being read at once, in bytes, whatever their number: a request
/// waits for room (its `Content-Length`, or its service's limit when it has none).
pub const BODY_BUDGET: usize = 64 << 20;
/// Calls in progress at once, streams (watches, exports) included; one more is refused with
/// `RESOURCE_EXHAUSTED`. A browser tab of the page keeps a few streams open.
pub const MAX_CALLS: usize = 64;
/// Connections open at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// Concurrent streams on one HTTP/2 (h2c) connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// How long an HTTP/1.1 connection may take to send a request's headers (also the idle
/// time allowed between requests on a kept-alive connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head (HTTP/1.1 read buffer, HTTP/2 header list).
pub const MAX_HEAD: usize = 64 << 10;
