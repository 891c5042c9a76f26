//! Mosca's chat server, embedded: every user has a topic `chat/<user>`
//! that its devices subscribe to with a persistent session (clean=false)
//! at QoS 1, so that what is sent while a device is away arrives, in
//! order, when it comes back. The application logs every message clients
//! publish, and a bot answers what is asked on `chat/bot/ask` on the
//! asker's own topic.
//!
//! Run it (an optional argument gives another address, `127.0.0.1:0` for
//! any free port):
//!
//! ```sh
//! cargo run -p broker-core --example chat
//! ```
//!
//! and try it with Mosquitto's clients:
//!
//! ```sh
//! mosquitto_sub -i alice -c -q 1 -t chat/alice        # alice's device; Ctrl-C it
//! mosquitto_pub -i bob -q 1 -t chat/alice -m hello    # while alice is away
//! mosquitto_sub -i alice -c -q 1 -t chat/alice        # alice is back: "hello"
//! mosquitto_sub -i bob -c -q 1 -t chat/bob &          # bob's inbox
//! mosquitto_pub -i bob -q 1 -t chat/bot/ask -m 'who is here?'
//! ```
//!
//! Sessions are kept in memory: they survive disconnects, not a restart
//! (the `broker` binary's SQLite store survives both).

use std::sync::Arc;

use broker_core::events::Event;
use broker_core::message::{Message, QoS};
use broker_core::storage::Storage;
use broker_core::Broker;
use storage_memory::MemoryStore;

/// Where anyone may ask the bot something.
const ASK: &str = "chat/bot/ask";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1883".into());
    let broker = Broker::builder()
        .storage(Storage::from_backend(Arc::new(MemoryStore::new())))
        .listen(addr)
        .start()
        .await?;

    // The bot reads the event stream rather than subscribing an in-process
    // client to `chat/bot/ask`: it must know who asked, to answer on
    // `chat/<asker>`, and a delivery does not say who published it (MQTT
    // has no such field), while a `Published` event carries the publisher.
    // The price: events are not a queue. A listener that falls behind loses
    // them (counted in `Broker::stats().events_dropped`) and nothing is
    // kept across a restart, which suits a log and a best-effort bot; work
    // that must not be lost belongs in a persistent in-process client.
    let events = broker.events(4096);
    let bot = tokio::spawn(log_and_answer(broker.clone(), events));

    for a in broker.local_addrs() {
        println!("listening on {a}");
    }
    tokio::signal::ctrl_c().await?;
    broker.shutdown().await;
    // The event stream ends with the broker, and the task with it.
    bot.await?;
    Ok(())
}

/// Print every message a client publishes; answer questions on `chat/<asker>`.
async fn log_and_answer(broker: Broker, mut events: broker_core::events::EventStream) {
    while let Some(event) = events.recv().await {
        // `client` is `None` for what the application (the bot's answers)
        // and the broker itself (`$SYS`) publish.
        let Event::Published {
            client: Some(c),
            message,
        } = event
        else {
            continue;
        };
        let who = c
            .username
            .clone()
            .unwrap_or_else(|| c.client_id.to_string());
        let text = String::from_utf8_lossy(&message.payload);
        println!("{who} -> {}: {text}", message.topic);
        if message.topic == ASK {
            let online = broker.stats().clients_connected;
            let answer = format!("you asked \"{text}\"; {online} client(s) online");
            let reply = Message::new(format!("chat/{who}"), answer, QoS::AtLeastOnce, false);
            // Returns once the answer is queued (and stored) for every
            // subscriber of `chat/<who>`, online or not.
            if let Err(e) = broker.publish(reply).await {
                eprintln!("cannot answer {who}: {e}");
            }
        }
    }
}
