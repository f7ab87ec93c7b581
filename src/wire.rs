//! Protocol messages ([`vkm_common::live`]) on a control stream, one per control message, for
//! `send`, `listen` and the receiving shim alike: the offer and its answer as CBOR
//! ([`send`], [`recv`]), the conversation after it as postcard ([`send_msg`], [`recv_msg`]).

use anyhow::{anyhow, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use vkm_common::image::{decode_meta, encode_meta};
use vkm_common::live::{decode_msg, encode_msg};
use vkm_transport::Control;

/// Send `msg` to `peer` (named in errors: "destination", "sender").
pub async fn send<T: Serialize>(control: &mut Control, msg: &T, peer: &str) -> Result<()> {
    send_bytes(control, &encode_meta(msg)?, peer).await
}

/// The next message from `peer`; its closing the stream is an error.
pub async fn recv<T: DeserializeOwned>(control: &mut Control, peer: &str) -> Result<T> {
    let bytes = recv_bytes(control, peer).await?;
    decode_meta(&bytes).with_context(|| format!("Cannot decode the {peer}'s message"))
}

/// [`send`] for the conversation after the offer.
pub async fn send_msg<T: Serialize>(control: &mut Control, msg: &T, peer: &str) -> Result<()> {
    send_bytes(control, &encode_msg(msg)?, peer).await
}

/// [`recv`] for the conversation after the offer.
pub async fn recv_msg<T: DeserializeOwned>(control: &mut Control, peer: &str) -> Result<T> {
    let bytes = recv_bytes(control, peer).await?;
    decode_msg(&bytes).with_context(|| format!("Cannot decode the {peer}'s message"))
}

async fn send_bytes(control: &mut Control, bytes: &[u8], peer: &str) -> Result<()> {
    control
        .send(bytes)
        .await
        .with_context(|| format!("Cannot send to the {peer}"))
}

async fn recv_bytes(control: &mut Control, peer: &str) -> Result<Vec<u8>> {
    control
        .recv()
        .await
        .with_context(|| format!("The link to the {peer} failed"))?
        .ok_or_else(|| anyhow!("The {peer} closed the connection"))
}
