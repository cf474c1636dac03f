//! AMQP exceptions: a reply code, a text that names the thing, and whether it closes
//! the channel or the whole connection (AMQP 0.9.1 section 1.8, RabbitMQ's codes).

use amq_protocol::protocol::AMQPClass;

use crate::error::{ErrorCode, RequestError};

pub const CONTENT_TOO_LARGE: u16 = 311;
pub const CONNECTION_FORCED: u16 = 320;
pub const NO_ROUTE: u16 = 312;
pub const ACCESS_REFUSED: u16 = 403;
pub const NOT_FOUND: u16 = 404;
pub const RESOURCE_LOCKED: u16 = 405;
pub const PRECONDITION_FAILED: u16 = 406;
pub const FRAME_ERROR: u16 = 501;
pub const SYNTAX_ERROR: u16 = 502;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const RESOURCE_ERROR: u16 = 506;
pub const NOT_ALLOWED: u16 = 530;
pub const NOT_IMPLEMENTED: u16 = 540;
pub const INTERNAL_ERROR: u16 = 541;

/// What an exception closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Channel,
    Connection,
}

/// An exception to send: `channel.close` or `connection.close` with these fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    pub scope: Scope,
    pub code: u16,
    pub text: String,
    /// The method that failed (0 when none did, e.g. a frame error).
    pub class_id: u16,
    pub method_id: u16,
}

impl AmqpError {
    pub fn channel(code: u16, text: impl Into<String>) -> Self {
        Self { scope: Scope::Channel, code, text: text.into(), class_id: 0, method_id: 0 }
    }

    pub fn connection(code: u16, text: impl Into<String>) -> Self {
        Self { scope: Scope::Connection, code, text: text.into(), class_id: 0, method_id: 0 }
    }

    /// Names the method the exception answers.
    pub fn on(mut self, method: &AMQPClass) -> Self {
        self.class_id = method.get_amqp_class_id();
        self.method_id = method.get_amqp_method_id();
        self
    }

    /// The reply text as clients show it: RabbitMQ's `NAME - text` form, then the id
    /// the broker's log line of the exception names (`[request id: ...]`, as gRPC
    /// errors end), cut to the 255 bytes of a short string (the text is cut, at a
    /// character boundary; the id is kept whole).
    pub fn reply_text(&self, request_id: &str) -> String {
        let suffix = format!(" [request id: {request_id}]");
        let mut text = format!("{} - {}", code_name(self.code), self.text);
        let room = SHORT_STRING_LEN_MAX.saturating_sub(suffix.len());
        if text.len() > room {
            let mut end = room;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text + &suffix
    }
}

/// Longest AMQP short string (the reply text is one), in bytes.
const SHORT_STRING_LEN_MAX: usize = 255;

fn code_name(code: u16) -> &'static str {
    match code {
        CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        CONNECTION_FORCED => "CONNECTION_FORCED",
        NO_ROUTE => "NO_ROUTE",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        FRAME_ERROR => "FRAME_ERROR",
        SYNTAX_ERROR => "SYNTAX_ERROR",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        RESOURCE_ERROR => "RESOURCE_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        _ => "INTERNAL_ERROR",
    }
}

/// A read that failed: the connection is gone (nothing can be sent on it anyway).
impl From<std::io::Error> for AmqpError {
    fn from(e: std::io::Error) -> Self {
        AmqpError::connection(INTERNAL_ERROR, format!("connection read failed: {e}"))
    }
}

/// The broker's refusals as channel exceptions: what does not exist is 404, what the
/// request got wrong is 406, what the cluster cannot do now (a retry may succeed) is
/// 541 with the broker's code in the text.
impl From<RequestError> for AmqpError {
    fn from(e: RequestError) -> Self {
        let code = match e.code {
            // The message names the user, the vhost (namespace) and the permission.
            ErrorCode::PermissionDenied | ErrorCode::Unauthenticated => ACCESS_REFUSED,
            ErrorCode::NamespaceNotFound | ErrorCode::TopicNotFound | ErrorCode::ConsumerGroupNotFound => NOT_FOUND,
            c if (c as u32) < 5000 => PRECONDITION_FAILED,
            ErrorCode::DiskFull => RESOURCE_ERROR,
            _ => INTERNAL_ERROR,
        };
        AmqpError::channel(code, format!("{} (EventterMQ code {})", e.message, e.code as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_texts_name_the_code_and_fit_a_short_string() {
        let e = AmqpError::channel(NOT_FOUND, "no exchange 'x' in vhost '/'");
        assert_eq!(e.reply_text("0a1b"), "NOT_FOUND - no exchange 'x' in vhost '/' [request id: 0a1b]");
        let long = AmqpError::channel(PRECONDITION_FAILED, "é".repeat(300));
        let id = "f".repeat(crate::peers::REQUEST_ID_LEN_MAX);
        let text = long.reply_text(&id);
        assert!(text.len() <= 255 && text.len() >= 254, "{}", text.len());
        assert!(text.starts_with("PRECONDITION_FAILED - é"), "{text}");
        assert!(text.ends_with(&format!("é [request id: {id}]")), "{text}");
    }

    #[test]
    fn broker_refusals_map_to_amqp_classes() {
        let not_found = RequestError::new(ErrorCode::TopicNotFound, "topic \"t\" does not exist");
        assert_eq!(AmqpError::from(not_found).code, NOT_FOUND);
        let invalid = RequestError::new(ErrorCode::InvalidName, "name: bad");
        assert_eq!(AmqpError::from(invalid).code, PRECONDITION_FAILED);
        let denied = RequestError::new(ErrorCode::PermissionDenied, "user \"bob\" has no write permission");
        assert_eq!(AmqpError::from(denied).code, ACCESS_REFUSED);
        let timeout = RequestError::new(ErrorCode::Timeout, "no leader");
        let e = AmqpError::from(timeout);
        assert_eq!((e.scope, e.code), (Scope::Channel, INTERNAL_ERROR));
        assert!(e.text.contains("EventterMQ code 5002"), "{}", e.text);
    }
}
