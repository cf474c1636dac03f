//! The codec of the node-to-node service: prost, with small first buffers.
//!
//! Every gRPC stream holds an encode and a decode buffer at each end, 8 KiB each by
//! default, allocated when the stream opens. A node keeps a replication stream per open
//! segment it is primary or replica of, most of them idle when topics are many and
//! quiet: 10,000 topics cost each node about 200 MiB of empty stream buffers at the
//! default. Buffers start at [`NODE_CODEC_BUFFER_BYTES`] here and grow with what a
//! stream carries, so a busy one ends up where it would have anyway.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// First size of a node-to-node stream's encode and decode buffers.
pub const NODE_CODEC_BUFFER_BYTES: usize = 512;

/// How much a stream encodes before it yields to other tasks (tonic's default).
const YIELD_THRESHOLD_BYTES: usize = 32 << 10;

/// [`ProstCodec`] with [`NODE_CODEC_BUFFER_BYTES`] first buffers.
#[derive(Debug, Clone)]
pub struct NodeCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for NodeCodec<T, U> {
    fn default() -> Self {
        NodeCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(NODE_CODEC_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

impl<T, U> Codec for NodeCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
