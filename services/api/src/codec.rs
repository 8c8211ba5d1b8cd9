//! The protobuf codec of every generated client and server: prost's, except
//! that a message that cannot be decoded is INVALID_ARGUMENT, not INTERNAL.
//!
//! A caller that sends a payload nested past what protobuf decoders accept
//! (see [`crate::json::MAX_DEPTH`]) made an invalid call, and is told so,
//! with the decoder's reason; the service is not broken.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Prost encoding; decoding errors as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct StreamerCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for StreamerCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for StreamerCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StreamerDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        StreamerDecoder(ProstDecoder::default())
    }
}

/// [`ProstDecoder`] with its errors re-coded.
#[derive(Debug)]
pub struct StreamerDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for StreamerDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            // prost names every enclosing field; the innermost reason is
            // the part worth reading.
            let reason = status.message().rsplit(": ").next().unwrap_or_default();
            crate::errors::Failure::new(
                tonic::Code::InvalidArgument,
                crate::errors::Reason::MalformedMessage,
                format!(
                    "the message cannot be decoded: {reason} (JSON values may nest at most {} levels)",
                    crate::json::MAX_DEPTH
                ),
            )
            .into()
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
