//! The gRPC codec of every engage service and client: prost's encoding, with decoding failures
//! answered as what they are, the client's mistake. tonic's own prost codec answers INTERNAL
//! with the decoder's internals ("failed to decode Protobuf message: Condition.kind: ...");
//! this one answers INVALID_ARGUMENT with a short message, and logs the details at debug.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// The codec (see the module documentation).
#[derive(Debug, Clone)]
pub(crate) struct StrictCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`, answering INVALID_ARGUMENT when the bytes are not one.
#[derive(Debug, Clone)]
pub(crate) struct StrictDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            tracing::debug!(error = %e, "a message does not decode");
            Status::invalid_argument(decode_problem(&e.to_string()))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// A short description of a decoding failure, without the decoder's internals.
fn decode_problem(detail: &str) -> &'static str {
    if detail.contains("recursion limit") {
        "request: the message is nested too deeply (at most 100 levels)"
    } else if detail.contains("UTF-8") {
        "request: a string field is not valid UTF-8"
    } else {
        "request: not a valid protobuf message of this method's request type"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_failures_are_described_without_internals() {
        assert_eq!(
            decode_problem("failed to decode Protobuf message: Condition.kind: recursion limit reached"),
            "request: the message is nested too deeply (at most 100 levels)"
        );
        assert_eq!(
            decode_problem("invalid string value: data is not UTF-8 encoded"),
            "request: a string field is not valid UTF-8"
        );
        assert!(decode_problem("buffer underflow").starts_with("request: not a valid"));
    }
}
