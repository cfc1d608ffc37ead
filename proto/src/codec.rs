//! The protobuf codec of every generated client and server: prost's, except that a message
//! that does not decode (invalid UTF-8 in a string field, a truncated field, ...) is the
//! caller's bad input, `INVALID_ARGUMENT`, not the server's fault (`INTERNAL`, prost's
//! default). The same decoder runs on the client side, where it flags a malformed response.

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
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
