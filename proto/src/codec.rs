//! The protobuf codec of every generated client and server: prost's, except that a message
//! that does not decode (invalid UTF-8 in a string field, a truncated field, ...) is the
//! caller's bad input, `INVALID_ARGUMENT`, not the server's fault (`INTERNAL`, prost's
//! default). The same decoder runs on the client side, where it flags a malformed response.
//! [`SharedCodec`] is the same codec for a stream whose sender keeps each message it sends
//! (`Arc<T>`), encoding it in place instead of taking a copy.

use std::{marker::PhantomData, sync::Arc};

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

/// [`tonic_prost::ProstCodec`] with decode failures reported as `INVALID_ARGUMENT`.
pub struct ProstCodec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        Self(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(self.0.decoder())
    }
}

/// [`ProstCodec`] sending shared messages: each `Arc<T>` is encoded where it is, so a sender
/// that keeps its messages (the proxy's ingest batches, until acknowledged) sends no copy.
pub struct SharedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SharedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SharedCodec<T, U>
where
    T: Message + Send + Sync + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = Arc<T>;
    type Decode = U;
    type Encoder = SharedEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SharedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::default().decoder()
    }
}

/// Encodes a shared message as prost encodes the message itself.
pub struct SharedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for SharedEncoder<T> {
    type Item = Arc<T>;
    type Error = Status;

    fn encode(&mut self, item: Arc<T>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // The buffer grows as needed: prost fails only for want of room, which it never lacks.
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Decodes as prost does; a failure becomes `INVALID_ARGUMENT` naming what was wrong.
pub struct ProstDecoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: Message + Default> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| match s.code() {
            Code::Internal => {
                Status::invalid_argument(format!("malformed protobuf message: {}", s.message()))
            }
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
