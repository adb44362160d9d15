//! gRPC over HTTP/2: message framing and the status / rich error model.

pub mod frame;
pub mod status;

pub use frame::{Encoding, FrameDecoder, FrameError, GrpcMessage};
pub use status::{Denial, ErrorCode, GrpcCode};
