// The dashboard's shared live connection: a SharedWorker that holds one Server-Sent Events stream of
// the global feed (/events/stream) for every dashboard page of this browser past the first few (those
// follow their own streams: see `live` in dashboard.js). A browser opens at most six HTTP/1.1
// connections to a host: with a stream per page, six open pages took them all, live updates stopped
// and a seventh page did not load.
//
// A page subscribes over its MessagePort to what it follows:
//   - {task}: the events of one task (the task page), as a signal to update;
//   - {}: any event (the task list), as a signal to update;
//   - {after}: every event after a cursor, in the feed's order, none missed or repeated (the events page).
// The worker answers with the stream's state ("live", "reconnecting"), "open" when the stream (re)opens
// or a subscriber joins an open one, and the events each subscriber asked for, in batches at most every
// FLUSH_EVERY ms. It keeps the last KEEP events, so a page that subscribes after some of them (it was
// rendered a moment before) gets them from here; a cursor older than that reopens the stream from it.
"use strict";

const FLUSH_EVERY = 50; // ms
const KEEP = 2000; // events kept for late subscribers: more than the events page shows
const IDLE_CLOSE = 5000; // ms the stream outlives its last page (moving between pages reuses it)

const subscribers = new Map(); // `${page}/${id}` -> {port, id, task, after, last}
const eventTypes = new Set();
let source = null;
let openedAfter = null; // the cursor the stream was opened after (null: from its head then)
let lastId = null; // the cursor of the newest event the stream brought
let kept = []; // [type, data, cursor] of the newest events, oldest first
let keptFrom = null; // every event after this cursor is in `kept` (null: not known)
let state = "reconnecting";
let delay = 1000;
let retry = null;
let idle = null;
let pending = [];
let flushing = null;
let pages = 0;

// Cursors are "<transaction id>-<position>", in the feed's order as pairs of integers.
function compare(a, b) {
  const [ta, pa] = a.split("-").map(BigInt);
  const [tb, pb] = b.split("-").map(BigInt);
  return ta === tb ? (pa < pb ? -1 : pa > pb ? 1 : 0) : ta < tb ? -1 : 1;
}

function broadcast(message) {
  const ports = new Set([...subscribers.values()].map((s) => s.port));
  for (const port of ports) port.postMessage(message);
}

function open(after) {
  clearTimeout(retry);
  retry = null;
  source?.close();
  openedAfter = after;
  if (after !== lastId || keptFrom === null) {
    kept = [];
    keptFrom = after;
  }
  source = new EventSource(after ? `/events/stream?after=${encodeURIComponent(after)}` : "/events/stream");
  for (const type of eventTypes) source.addEventListener(type, received);
  source.onopen = () => {
    delay = 1000;
    state = "live";
    broadcast({ op: "state", state });
    for (const s of subscribers.values()) s.port.postMessage({ op: "open", id: s.id });
  };
  source.onerror = () => {
    state = "reconnecting";
    broadcast({ op: "state", state });
    if (source.readyState === EventSource.CLOSED) {
      // The browser gave up (a 401 after the session ended, a restart): try again from the last event.
      source.close();
      source = null;
      retry = setTimeout(() => open(lastId ?? openedAfter), delay);
      delay = Math.min(delay * 2, 30000);
    }
  };
}

function close() {
  clearTimeout(retry);
  retry = null;
  source?.close();
  source = null;
  lastId = openedAfter = keptFrom = null;
  kept = [];
  state = "reconnecting";
}

function received(e) {
  if (!e.lastEventId) return;
  lastId = e.lastEventId;
  const event = [e.type, e.data, lastId];
  kept.push(event);
  if (kept.length > KEEP * 1.5) {
    keptFrom = kept[kept.length - KEEP - 1][2];
    kept = kept.slice(-KEEP);
  }
  pending.push(event);
  if (flushing === null) flushing = setTimeout(flush, FLUSH_EVERY);
}

function taskOf(event) {
  if (event.length === 3) {
    try {
      event.push(JSON.parse(event[1]).task_id);
    } catch {
      event.push(null);
    }
  }
  return event[3];
}

// What a subscriber is sent of these events: [type, data, cursor] each, or for a signal, [type] each.
function deliver(subscriber, events) {
  let chosen;
  if (subscriber.after !== undefined) {
    chosen = subscriber.last === null ? events : events.filter((e) => compare(e[2], subscriber.last) > 0);
    if (chosen.length) subscriber.last = chosen[chosen.length - 1][2];
    chosen = chosen.map((e) => e.slice(0, 3));
  } else if (subscriber.task) {
    chosen = events.filter((e) => taskOf(e) === subscriber.task).map((e) => [e[0]]);
  } else {
    chosen = events.length ? [[events[events.length - 1][0]]] : [];
  }
  if (chosen.length) subscriber.port.postMessage({ op: "events", id: subscriber.id, events: chosen });
}

function flush() {
  flushing = null;
  const events = pending;
  pending = [];
  for (const subscriber of subscribers.values()) deliver(subscriber, events);
}

function subscribe(port, page, { id, task, after, types }) {
  clearTimeout(idle);
  idle = null;
  for (const type of types) {
    if (eventTypes.has(type)) continue;
    eventTypes.add(type);
    source?.addEventListener(type, received);
  }
  const subscriber = { port, id, task: task ?? null, after, last: after ?? null };
  flush(); // what came before this subscriber belongs to the others only
  subscribers.set(`${page}/${id}`, subscriber);
  // A stream waiting to reconnect (backing off after a sign-out or a restart) tries again now: a page
  // just opened, perhaps just signed in again, should not wait up to 30 s.
  const waiting = retry !== null;
  if (after === undefined) {
    if (!source) open(lastId ?? openedAfter);
  } else if ((source || waiting) && keptFrom !== null && compare(keptFrom, after) <= 0) {
    deliver(subscriber, kept);
    if (waiting) open(lastId ?? openedAfter);
  } else {
    // Not known from here: read the feed again from the oldest cursor a subscriber still needs (the
    // others are sent only what follows what they have had).
    const needed = [...subscribers.values()].filter((s) => s.after !== undefined && s.last !== null).map((s) => s.last);
    open(needed.length ? needed.reduce((a, b) => (compare(a, b) <= 0 ? a : b)) : null);
    return;
  }
  port.postMessage({ op: "state", state });
  if (state === "live") port.postMessage({ op: "open", id });
}

function unsubscribe(page, id) {
  subscribers.delete(`${page}/${id}`);
  if (subscribers.size === 0 && idle === null) idle = setTimeout(close, IDLE_CLOSE);
}

onconnect = (e) => {
  const port = e.ports[0];
  const page = (pages += 1);
  port.onmessage = ({ data }) => {
    if (data.op === "subscribe") subscribe(port, page, data);
    else if (data.op === "unsubscribe") unsubscribe(page, data.id);
    else if (data.op === "bye") for (const s of [...subscribers.values()]) if (s.port === port) unsubscribe(page, s.id);
  };
};
