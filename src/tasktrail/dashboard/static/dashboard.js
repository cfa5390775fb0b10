// The dashboard's one script. The server renders every page whole (it works without this file);
// this makes it live and runs its actions:
//   - it listens to the API's own event streams (/events/stream, /tasks/{id}/stream) and, at most
//     every APPLY_EVERY ms and never two at once, fetches the page again and patches what changed
//     in place (rows by data-task-id, counts, the timeline by data-version), so a write storm costs
//     the page a few fetches a second, not one update per event, and focus and selection survive;
//   - the events page builds its rows from the stream's JSON with textContent only, into a copy of
//     the server's own <template> row, and keeps at most CAP of them;
//   - actions go to the API as JSON with If-Match (and the session's X-CSRF-Token when signed in);
//   - every read after a write carries the write's Tasktrail-Read-After token (SPEC §13), so a replica
//     that has not replayed the write does not answer it: fetches send it in the header, and a
//     short-lived cookie (Path=/ui) carries it to the pages the browser opens next.
// No innerHTML anywhere: text from the server or the stream only ever becomes text.

const APPLY_EVERY = 250; // ms between two updates of the page, at most
const FINISHING = new Set(["TaskCompleted", "TaskFailed", "TaskCanceled", "TaskDeleted"]);
const FINISHED = new Set(["completed", "failed", "canceled"]);
const BATCH = 1000; // items per PATCH /tasks/batch, the API's limit
const LISTED = 200; // tasks a bulk action's result lists per outcome, and how many more each "Show more" adds

document.documentElement.classList.add("js");
const body = document.body;
const csrf = document.querySelector('meta[name="csrf-token"]')?.content ?? null;
const eventTypes = (body.dataset.eventTypes || "").split(" ").filter(Boolean);
const liveBadge = document.getElementById("live");
const number = new Intl.NumberFormat("en");

// The token of this browser's latest write; another tab's later write replaces the cookie, and wins.
const READ_AFTER = "Tasktrail-Read-After";
const READ_AFTER_COOKIE = "tasktrail_read_after";
let readAfter = null;

function readAfterToken() {
  const cookie = document.cookie.split("; ").find((c) => c.startsWith(`${READ_AFTER_COOKIE}=`));
  return cookie ? cookie.slice(READ_AFTER_COOKIE.length + 1) : readAfter;
}

function remember(response) {
  const token = response.headers.get(READ_AFTER);
  // Tokens are the service's own (a WAL position, or a word): nothing a cookie would need to escape.
  if (!token || !/^[0-9A-Za-z/]{1,64}$/.test(token)) return;
  readAfter = token;
  if (body.dataset.readAfterMaxAge === "0") return; // no replicas: every read is the primary's, no cookie
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = `${READ_AFTER_COOKIE}=${token}; Path=/ui; Max-Age=${body.dataset.readAfterMaxAge}; SameSite=Strict${secure}`;
}

// Headers for a read: the latest write's token, if any.
function readHeaders(headers = {}) {
  const token = readAfterToken();
  return token ? { ...headers, [READ_AFTER]: token } : headers;
}

function setLive(state, text) {
  liveBadge.hidden = false;
  liveBadge.dataset.state = state;
  liveBadge.textContent = text;
}

function withParam(url, name, value) {
  const u = new URL(url, location.origin);
  u.searchParams.set(name, value);
  return u.pathname + u.search;
}

// A stream that cannot reconnect may be one whose dashboard session ended (signed out, here or in
// another tab; the server ends such streams): the page then says so rather than "Reconnecting…", and
// asks no more (each refused request is an error in the browser's console: audit) until a page of this
// browser is served to a session again, which tells the others on SESSION_CHANNEL.
const SIGNED_OUT = "Signed out: reload to sign in";
const SESSION_CHANNEL = typeof BroadcastChannel === "function" ? new BroadcastChannel("tasktrail-session") : null;
let signedOut = false;
const onSignIn = []; // what goes on once signed in again
if (SESSION_CHANNEL) {
  SESSION_CHANNEL.onmessage = ({ data }) => {
    if (data !== "signed-in" || !signedOut) return;
    signedOut = false;
    for (const resume of onSignIn.splice(0)) resume();
  };
  if (csrf) SESSION_CHANNEL.postMessage("signed-in");
}

async function sayIfSignedOut() {
  if (!csrf || signedOut) return signedOut; // no session: none to end
  try {
    const response = await fetch("/tasks/stats/summary", { headers: readHeaders(), cache: "no-store" });
    if (response.status === 401) {
      signedOut = SESSION_CHANNEL !== null; // without the channel, the streams keep trying: how it hears
      if (liveBadge.dataset.state === "reconnecting") setLive("offline", SIGNED_OUT);
    }
  } catch {
    // not reachable: "Reconnecting…" is true
  }
  return signedOut;
}

// Follows a Server-Sent Events stream: onEvent(type, data, id) per message; reconnects with
// backoff (from the last id) when the browser gives up, e.g. after a 401 or a restart.
function follow(url, { onEvent, onOpen }) {
  let source = null;
  let lastId = null;
  let delay = 1000;
  let stopped = false;
  let timer = null;
  const handler = (e) => {
    if (e.lastEventId) lastId = e.lastEventId;
    onEvent(e.type, e.data, lastId);
  };
  function open() {
    timer = null;
    source = new EventSource(lastId ? withParam(url, "after", lastId) : url);
    source.onopen = () => {
      delay = 1000;
      if (!paused) setLive("live", "Live");
      onOpen?.();
    };
    for (const type of [...eventTypes, "snapshot"]) source.addEventListener(type, handler);
    source.onerror = async () => {
      if (stopped) return;
      setLive("reconnecting", "Reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        if (await sayIfSignedOut()) {
          onSignIn.push(() => stopped || open()); // from the last id, as any reconnect
          return;
        }
        if (stopped) return;
        timer = setTimeout(open, delay);
        delay = Math.min(delay * 2, 30000);
      }
    };
  }
  open();
  return {
    close() {
      stopped = true;
      clearTimeout(timer);
      source?.close();
    },
  };
}

// The page's live streams. A browser opens at most six connections to a host, and each stream holds
// one: with a stream per page, six open pages took them all and a seventh did not load. So the first
// OWN pages of this browser follow their own streams, each holding one of OWN Web Locks (let go of as
// the page goes), and the others share the one stream of the feed that live-worker.js (a SharedWorker)
// holds for them, which sends each what its own stream would have had: OWN + 1 streams, however many
// pages, and other releases' workers aside. Without SharedWorker, every page follows its own streams.
const OWN = 2;
const live = (() => {
  const subscriptions = new Map();
  let mode = "asking"; // then "own" or "shared"
  let port = null;
  let joined = false;
  let next = 0;

  function start(s) {
    const url = new URL(s.url, location.origin);
    // The events page's stream has a cursor: it goes on from the last event the page was given.
    const after = url.searchParams.has("after") ? (s.last ?? url.searchParams.get("after")) : undefined;
    if (mode === "own") {
      s.own = follow(after ? withParam(s.url, "after", after) : s.url, s.handlers);
    } else if (mode === "shared") {
      // What the worker needs of a stream's URL: /tasks/{id}/stream is that task's events, ?after= a cursor
      // (or the task a subscriber to the feed asks for: the events of that task only).
      const task = s.handlers.task ?? url.pathname.match(/^\/tasks\/([^/]+)\/stream$/)?.[1];
      port.postMessage({ op: "subscribe", id: s.id, task, after, types: eventTypes });
    }
  }
  function decided(how) {
    mode = how;
    for (const s of subscriptions.values()) start(s);
  }
  function received({ data: message }) {
    if (message.op === "state") {
      if (message.state !== "live") {
        // The worker's stream keeps trying (in the worker: no error in this page's console).
        if (signedOut) setLive("offline", SIGNED_OUT);
        else {
          setLive("reconnecting", "Reconnecting…");
          sayIfSignedOut();
        }
      } else if (!paused) setLive("live", "Live");
    } else if (message.op === "open") subscriptions.get(message.id)?.handlers.onOpen?.();
    else if (message.op === "events") {
      const s = subscriptions.get(message.id);
      if (!s) return;
      for (const [type, data, cursor] of message.events) s.handlers.onEvent(type, data, cursor);
      s.last = message.events.at(-1)[2] ?? null; // a cursor for the events page, whose subscription has them
    }
  }
  // One of the own places, held while the page lives; false when all are taken (or there are no locks).
  async function ownPlace() {
    for (let i = 0; i < OWN && navigator.locks; i += 1) {
      const held = await new Promise((resolve) => {
        navigator.locks.request(`tasktrail-own-stream-${i}`, { ifAvailable: true }, (lock) => {
          resolve(lock !== null);
          return lock && new Promise(() => {}); // never let go: the page's going does
        });
      });
      if (held) return true;
    }
    return false;
  }
  async function join() {
    joined = true;
    // A page holding a place is not kept in the page cache; should one come back from it, it starts anew.
    addEventListener("pageshow", (e) => e.persisted && mode === "own" && location.reload());
    if (!body.dataset.liveWorker || typeof SharedWorker !== "function" || (await ownPlace())) {
      decided("own");
      return;
    }
    try {
      const worker = new SharedWorker(body.dataset.liveWorker, { name: "tasktrail-live" });
      worker.onerror = () => mode === "shared" && decided("own"); // the script did not load: nothing came
      port = worker.port;
      port.onmessage = received;
      // Leaving, the page stops its subscriptions; back from the browser's page cache, it starts them again.
      addEventListener("pagehide", () => port.postMessage({ op: "bye" }));
      addEventListener("pageshow", (e) => e.persisted && decided("shared"));
      decided("shared");
    } catch {
      decided("own");
    }
  }

  return {
    // As follow(url, handlers): through the shared stream when this page has no place of its own.
    follow(url, handlers) {
      if (!joined) join();
      const s = { id: (next += 1), url, handlers, own: null, last: null };
      subscriptions.set(s.id, s);
      start(s);
      return {
        close() {
          subscriptions.delete(s.id);
          if (s.own) s.own.close();
          else if (mode === "shared") port.postMessage({ op: "unsubscribe", id: s.id });
        },
      };
    },
  };
})();

// Runs job() at most every every() ms while something asked for it, never two at once. every() is
// asked again at each request: a shorter answer brings the next run forward. A job that failed is run
// again, after a wait that doubles with each failure in a row (to 30 s), not four times a second.
// While it fails the badge says so; once it succeeds, the badge says again what it said before.
const UPDATE_FAILED = "Update failed; retrying…";
function coalesce(job, every = () => APPLY_EVERY) {
  let wanted = false;
  let running = false;
  let last = 0;
  let timer = null;
  let due = 0;
  let backoff = 0;
  let before = null; // the badge as it was when the first failure in a row replaced it
  async function run() {
    timer = null;
    if (running || !wanted) return;
    wanted = false;
    running = true;
    last = performance.now();
    try {
      await job();
      backoff = 0;
      if (before && liveBadge.textContent === UPDATE_FAILED) {
        setLive(before.state, before.text);
        liveBadge.hidden = before.hidden;
      }
      before = null;
    } catch {
      if (liveBadge.textContent !== UPDATE_FAILED) {
        before = { state: liveBadge.dataset.state, text: liveBadge.textContent, hidden: liveBadge.hidden };
      }
      setLive("reconnecting", UPDATE_FAILED);
      backoff = Math.min(30000, Math.max(APPLY_EVERY, backoff * 2));
      wanted = true;
    } finally {
      running = false;
      if (wanted) schedule();
    }
  }
  function schedule() {
    if (running) return;
    const at = last + every() + backoff;
    if (timer !== null && at >= due) return;
    clearTimeout(timer);
    due = at;
    timer = setTimeout(run, Math.max(0, at - performance.now()));
  }
  return () => {
    wanted = true;
    schedule();
  };
}

// This page as the server renders it now; null when the session has ended. A page fetches itself again
// when its streams say something committed; a replica within --replica-max-lag may not have replayed that
// yet (the stream itself may have read it from the primary), so with replicas it asks the primary.
const REFRESH_FROM = body.dataset.readAfterMaxAge === "0" ? {} : { [READ_AFTER]: "primary" };

async function fetchPage(url = location.pathname + location.search) {
  const headers = { ...readHeaders({ Accept: "text/html" }), ...REFRESH_FROM };
  const response = await fetch(url, { headers, cache: "no-store" });
  if (response.redirected && new URL(response.url).pathname === "/ui/sign-in") {
    setLive("offline", SIGNED_OUT);
    return null;
  }
  if (!response.ok) throw new Error(`page answered ${response.status}`);
  const page = new DOMParser().parseFromString(await response.text(), "text/html");
  noticeSignIn(page);
  return page;
}

// The browser signed in again (in another tab or window) since this page was served: the session's
// cookie is the new sign-in's, while this page's CSRF token and the name it shows are the old one's,
// so the service refuses its writes. The page says so, once, above its content.
const SIGNED_IN_AGAIN = "You signed in again in another tab or window: reload this page to act as that sign-in.";
let signedInAgain = false;

function noticeSignIn(page) {
  const token = page.querySelector('meta[name="csrf-token"]')?.content;
  if (signedInAgain || !csrf || !token || token === csrf) return;
  signedInAgain = true;
  const notice = el("p", SIGNED_IN_AGAIN + " ", { class: "notice error", role: "alert", id: "signed-in-again" });
  const reload = el("button", "Reload", { type: "button", class: "link" });
  reload.addEventListener("click", () => location.reload());
  notice.append(reload);
  document.getElementById("main").prepend(notice);
}

function syncText(fresh, selector) {
  const now = fresh.querySelectorAll(selector);
  document.querySelectorAll(selector).forEach((element, i) => {
    if (now[i] && element.textContent !== now[i].textContent) element.textContent = now[i].textContent;
  });
}

function syncAttributes(element, fresh, names) {
  for (const name of names) {
    const value = fresh.getAttribute(name);
    if (value === null) element.removeAttribute(name);
    else if (element.getAttribute(name) !== value) element.setAttribute(name, value);
  }
}

// Brings a list in line with the fresh one, keyed by an attribute: removes what went, inserts what
// came, and patches what stayed cell by cell, so a focused or checked control is left alone.
function syncKeyed(list, fresh, key, patch) {
  const keyOf = (element) => element.getAttribute(key) ?? "";
  const incoming = [...fresh.children];
  const wanted = new Set(incoming.map(keyOf));
  for (const element of [...list.children]) if (!wanted.has(keyOf(element))) element.remove();
  const present = new Map([...list.children].map((element) => [keyOf(element), element]));
  let next = list.firstElementChild;
  for (const element of incoming) {
    const old = present.get(keyOf(element));
    if (old) {
      patch(old, element);
      if (old === next) next = next.nextElementSibling;
      else list.insertBefore(old, next);
    } else {
      list.insertBefore(document.importNode(element, true), next);
    }
  }
}

function replaceIfChanged(element, fresh) {
  if (element && fresh && !element.isEqualNode(fresh)) element.replaceWith(document.importNode(fresh, true));
}

// Brings a part of the page in line with the fresh one node by node: an unchanged node stays the same
// node, so focus and a selection in it survive a live change (replacing the part lost both).
function morph(element, fresh) {
  if (!element || !fresh || element.isEqualNode(fresh)) return;
  if (element.nodeName !== fresh.nodeName || element.childNodes.length !== fresh.childNodes.length) {
    element.replaceWith(document.importNode(fresh, true));
  } else if (element.nodeType !== Node.ELEMENT_NODE) {
    element.nodeValue = fresh.nodeValue;
  } else {
    syncAttributes(element, fresh, [...new Set([...element.getAttributeNames(), ...fresh.getAttributeNames()])]);
    const children = [...element.childNodes];
    fresh.childNodes.forEach((child, i) => morph(children[i], child));
  }
}

async function api(method, url, payload, headers = {}) {
  const init = { method, headers: readHeaders({ Accept: "application/json", ...headers }) };
  if (csrf) init.headers["X-CSRF-Token"] = csrf;
  if (payload !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(payload);
  }
  const response = await fetch(url, init);
  if (method !== "GET" && response.ok) remember(response);
  let answer = null;
  if ((response.headers.get("content-type") || "").includes("json")) answer = await response.json();
  if (response.status === 403 && csrf && !signedInAgain) {
    // Refused for this page's token (or for its scope): is the browser's session still the page's?
    await fetchPage().catch(() => null);
  }
  return { status: response.status, answer, headers: response.headers };
}

function problemText(result) {
  if (result.status === 401) return "Your session has ended: reload the page to sign in again.";
  if (result.status === 403 && signedInAgain) return SIGNED_IN_AGAIN;
  if (result.status === 403) return result.answer?.detail || "Your key's scope does not allow this.";
  return result.answer?.detail || `The service answered ${result.status}.`;
}

function el(tag, text, attributes = {}) {
  const element = document.createElement(tag);
  if (text !== undefined && text !== null) element.textContent = text;
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  return element;
}

let paused = false;

// ---- /ui: counts and the task list ----------------------------------------------------------

function tasksPage() {
  const rows = document.getElementById("task-rows");
  const selected = new Map(); // task id -> {version, status}, kept across live updates
  let allMatching = false;
  const bulk = document.getElementById("bulk");

  function patchRow(old, fresh) {
    syncAttributes(old, fresh, ["data-status"]);
    [...fresh.cells].forEach((cell, i) => {
      const current = old.cells[i];
      if (!current || current.isEqualNode(cell) || cell.dataset.kept !== undefined) return;
      const box = current.querySelector("input.pick");
      const freshBox = cell.querySelector("input.pick");
      if (box && freshBox) {
        box.dataset.ifVersion = freshBox.dataset.ifVersion;
        if (selected.has(box.value)) selected.set(box.value, { version: box.dataset.ifVersion, status: fresh.dataset.status });
      } else {
        current.replaceWith(document.importNode(cell, true));
      }
    });
  }

  // Rows of a page served to another session (signed in again, in another tab, with a key of another
  // scope) have a column of checkboxes where this page has none, or none where it has one: brought to
  // this page's columns, so that each value stays under its heading (the notice says to reload).
  const pickColumn = Boolean(document.getElementById("pick-page"));
  function asThisPage(freshRows) {
    for (const row of freshRows.querySelectorAll("tr[data-task-id]")) {
      const picks = row.cells[0]?.classList.contains("pick");
      if (picks && !pickColumn) row.cells[0].remove();
      if (!picks && pickColumn) row.prepend(el("td", null, { class: "pick needs-js", "data-kept": "" }));
    }
    return freshRows;
  }

  const refresh = coalesce(async () => {
    const fresh = await fetchPage();
    if (!fresh) return;
    syncKeyed(rows, asThisPage(fresh.getElementById("task-rows")), "data-task-id", patchRow);
    // A selected row that left the page (out of the filter, past the page's end, deleted) leaves the
    // selection: a bulk action acts only on rows the page shows ticked.
    const shownIds = new Set([...rows.querySelectorAll("input.pick")].map((box) => box.value));
    for (const id of selected.keys()) if (!shownIds.has(id)) selected.delete(id);
    for (const box of rows.querySelectorAll("input.pick")) box.checked = allMatching || selected.has(box.value);
    syncText(fresh, "[data-count]");
    syncText(fresh, ".head .sub");
    syncText(fresh, "#select-matching .n");
    syncText(fresh, "#select-matching .w");
    replaceIfChanged(document.getElementById("pager"), fresh.getElementById("pager")); // "Older" comes and goes
    const freshBulk = fresh.getElementById("bulk");
    if (bulk && freshBulk) syncAttributes(bulk, freshBulk, ["data-matching"]);
    const selectMatching = document.getElementById("select-matching");
    const freshSelectMatching = fresh.getElementById("select-matching");
    if (selectMatching && freshSelectMatching) syncAttributes(selectMatching, freshSelectMatching, ["hidden"]);
    updateBulk();
  });

  live.follow(body.dataset.stream, {
    onEvent: (type, data) => {
      // A deleted task leaves the selection at once (its row goes at the refresh, and so would it).
      // A page fed by the shared worker hears only that something happened, with no data: the
      // refresh's own check of the selection against the rows shown takes the task out then.
      if (type === "TaskDeleted" && data) selected.delete(JSON.parse(data).task_id);
      refresh();
    },
    onOpen: refresh,
  });
  if (bulk) bulkActions();

  // A row's task as the page shows it: the version an action on it is sent with, and its status.
  function picked(box) {
    return { version: box.dataset.ifVersion, status: box.closest("tr").dataset.status };
  }

  function updateBulk() {
    if (!bulk) return;
    const matching = Number(bulk.dataset.matching);
    const count = allMatching ? matching : selected.size;
    const selection = document.getElementById("selection");
    const said = allMatching
      ? [`All ${number.format(matching)} `, ...matchingWords(matching), " selected."]
      : [count ? `${number.format(count)} selected.` : "No tasks selected."];
    // A live region: written only when it says something new, not at each refresh.
    if (said.map((part) => (typeof part === "string" ? part : part.textContent)).join("") !== selection.textContent) {
      selection.replaceChildren(...said);
    }
    for (const button of bulk.querySelectorAll("[data-bulk]")) button.disabled = count === 0;
    document.getElementById("select-matching").setAttribute("aria-pressed", String(allMatching));
    const boxes = [...rows.querySelectorAll("input.pick")];
    const pagePick = document.getElementById("pick-page");
    pagePick.checked = boxes.length > 0 && boxes.every((box) => box.checked);
    pagePick.indeterminate = !pagePick.checked && boxes.some((box) => box.checked);
  }

  function bulkActions() {
    rows.addEventListener("change", (e) => {
      const box = e.target.closest("input.pick");
      if (!box) return;
      allMatching = false;
      if (box.checked) selected.set(box.value, picked(box));
      else selected.delete(box.value);
      for (const other of rows.querySelectorAll("input.pick")) other.checked = selected.has(other.value);
      updateBulk();
    });
    document.getElementById("pick-page").addEventListener("change", (e) => {
      allMatching = false;
      for (const box of rows.querySelectorAll("input.pick")) {
        box.checked = e.target.checked;
        if (box.checked) selected.set(box.value, picked(box));
        else selected.delete(box.value);
      }
      updateBulk();
    });
    document.getElementById("select-matching").addEventListener("click", () => {
      allMatching = !allMatching;
      if (!allMatching) selected.clear();
      for (const box of rows.querySelectorAll("input.pick")) box.checked = allMatching;
      updateBulk();
    });
    const dialog = document.getElementById("bulk-confirm");
    let chosen = null;
    let confirmed = null; // for "all matching": how many the dialog said, and the newest of them
    let shown = null; // the selected rows at the versions the dialog asked about (live updates go on meanwhile)
    for (const button of bulk.querySelectorAll("[data-bulk]")) {
      button.addEventListener("click", async () => {
        chosen = button.dataset.bulk;
        // Every row's version as this page shows it now, for "all matching" too: a task shown here that
        // changes while the dialog is open is then refused as changed since shown, not overwritten.
        shown = allMatching ? new Map([...rows.querySelectorAll("input.pick")].map((box) => [box.value, picked(box)])) : new Map(selected);
        const verb = { cancel: "Cancel", retry: "Retry", delete: "Delete" }[chosen];
        let count = allMatching ? Number(bulk.dataset.matching) : selected.size;
        if (allMatching) {
          // Tasks created after this moment are not among the ones confirmed: they are left alone. The
          // count is read now too (the page's may be behind), after the newest, so it leaves none out.
          const head = await api("GET", `/tasks/?${matchingQuery(1)}`);
          const newest = head.status === 200 && head.answer.length ? head.answer[0].id : 0;
          count = (await matchingCount()) ?? count;
          confirmed = { count, newest };
        }
        const what = allMatching ? [`all ${number.format(count)} `, ...matchingWords(count)] : [`${number.format(count)} selected ${count === 1 ? "task" : "tasks"}`];
        document.getElementById("bulk-confirm-title").textContent = `${verb} ${number.format(count)} ${count === 1 ? "task" : "tasks"}?`;
        document.getElementById("bulk-confirm-text").replaceChildren(
          `${verb} `,
          ...what,
          ". " + (chosen === "delete" ? "Their histories stay. " : "") + "A task that changed since this page showed it is left alone and reported.",
        );
        document.getElementById("bulk-confirm-go").textContent = `${verb} ${number.format(count)} ${count === 1 ? "task" : "tasks"}`;
        dialog.returnValue = "";
        dialog.showModal();
      });
    }
    dialog.addEventListener("close", () => {
      if (dialog.returnValue === "go" && chosen) runBulk(chosen, allMatching ? confirmed : null, shown);
    });
  }

  // What the filter matches, in words ("running tasks of type X"), the type in a <bdi>: a type written
  // right to left (or holding direction marks) cannot reorder the sentence around it.
  function matchingWords(count) {
    const status = bulk.dataset.statusFilter;
    const noun = count === 1 ? "task" : "tasks";
    const words = status ? `${status} ${noun}` : noun;
    return bulk.dataset.typeFilter ? [`${words} of type `, el("bdi", bulk.dataset.typeFilter)] : [words];
  }

  // How many tasks the filter matches now, from the counters; undefined if they could not be read.
  async function matchingCount() {
    const type = bulk.dataset.typeFilter;
    const stats = await api("GET", `/tasks/stats/summary${type ? `?${new URLSearchParams({ task_type: type })}` : ""}`);
    const n = stats.status === 200 ? stats.answer?.[bulk.dataset.statusFilter || "total"] : undefined;
    return Number.isInteger(n) ? n : undefined;
  }

  function matchingQuery(limit) {
    const query = new URLSearchParams({ limit: String(limit) });
    if (bulk.dataset.statusFilter) query.set("status", bulk.dataset.statusFilter);
    if (bulk.dataset.typeFilter) query.set("task_type", bulk.dataset.typeFilter);
    return query;
  }

  // `everyMatching`: act on every task the filter matches that is no newer than the newest when the
  // dialog was opened (tasks created while it was open are not the ones confirmed); its count is what
  // the dialog said, a measure of the work, not a cap: a task left out would be one confirmed.
  // `shown`: the selected rows (for "all matching", every row) as the dialog showed them, so a row that
  // changed while it was open is sent with the version confirmed, and refused as changed since shown;
  // a matching task this page did not show is sent with the version the walk reads.
  async function runBulk(action, everyMatching, shown) {
    const panel = document.getElementById("bulk-run");
    const verb = { cancel: "Canceling", retry: "Retrying", delete: "Deleting" }[action];
    const total = everyMatching ? everyMatching.count : shown.size;
    const chosenRows = everyMatching ? null : [...shown.entries()];
    selected.clear();
    allMatching = false;
    for (const box of rows.querySelectorAll("input.pick")) box.checked = false;
    updateBulk();
    for (const button of bulk.querySelectorAll("button")) button.disabled = true;

    const labels = {
      done: "done",
      unchanged: "already so",
      skipped: "skipped: not failed or canceled",
      finished: "not allowed (already finished)",
      conflict: "changed since shown",
      gone: "gone",
      left: "not sent: no longer matching the filter",
      failed: "failed",
    };
    // Each outcome's tasks, how many of them its list shows, and whether it is open (kept across renders).
    const groups = Object.fromEntries(
      Object.entries(labels).map(([key, label]) => [key, { label, items: [], unlisted: 0, listed: LISTED, open: false }]),
    );
    let handled = 0;
    let stop = false;
    let failure = null; // why the run stopped by itself: said in its status line, and kept there
    panel.hidden = false;
    panel.replaceChildren();
    const title = el("h2", `${verb} ${number.format(total)} tasks…`);
    const bar = el("progress", null, { max: String(Math.max(total, 1)), value: "0", "aria-label": "Bulk action progress" });
    const status = el("p", `0 of ${number.format(total)} handled.`);
    const tally = el("ul", null, { class: "tally" });
    const details = el("div");
    const stopButton = el("button", "Stop after this batch", { type: "button" });
    stopButton.addEventListener("click", () => {
      stop = true;
      stopButton.disabled = true;
    });
    panel.append(title, bar, status, stopButton, tally, details);

    function show() {
      bar.max = Math.max(total, handled, 1);
      bar.value = handled;
      const count = `${number.format(handled)} of ${number.format(Math.max(total, handled))} handled.`;
      status.textContent = failure ? `Stopped: ${failure} ${count}` : count;
      tally.replaceChildren(
        ...Object.values(groups)
          .filter((g) => g.items.length + g.unlisted)
          .map((g) => {
            const li = el("li");
            li.append(el("strong", number.format(g.items.length + g.unlisted)), ` ${g.label}`);
            return li;
          }),
      );
      details.replaceChildren(
        ...Object.entries(groups)
          .filter(([, g]) => g.items.length + g.unlisted)
          .map(([key, g]) => {
            const box = el("details", null, { "data-group": key });
            box.open = g.open;
            box.addEventListener("toggle", () => (g.open = box.open));
            box.append(el("summary", `${g.label}: ${number.format(g.items.length + g.unlisted)}`));
            const list = el("ul");
            for (const [taskId, note] of g.items.slice(0, g.listed)) {
              const li = el("li");
              li.append(el("a", taskId, { href: `/ui/tasks/${encodeURIComponent(taskId)}` }));
              if (note) li.append(` — ${note}`);
              list.append(li);
            }
            if (g.unlisted) list.append(el("li", `${number.format(g.unlisted)} not shown on this page when confirmed`));
            box.append(list);
            if (g.items.length > g.listed) {
              // Every task stays reachable, a page more at a time: the page stays small.
              const rest = g.items.length - g.listed;
              const more = el("button", `Show ${number.format(Math.min(LISTED, rest))} more (${number.format(rest)} not shown)`, { type: "button", class: "link" });
              more.addEventListener("click", () => {
                const first = g.listed;
                g.listed += LISTED;
                show();
                details.querySelector(`[data-group="${key}"] li:nth-child(${first + 1}) a`)?.focus();
              });
              box.append(more);
            }
            return box;
          }),
      );
    }

    function item(taskId, version) {
      const ifVersion = Number(version);
      if (action === "delete") return { task_id: taskId, delete: true, if_version: ifVersion };
      return { task_id: taskId, status: action === "cancel" ? "canceled" : "pending", if_version: ifVersion };
    }

    async function send(batch) {
      const wanted = [];
      for (const { id, version, status: taskStatus } of batch) {
        if (action === "retry" && taskStatus !== "failed" && taskStatus !== "canceled") {
          groups.skipped.items.push([id, `it is ${taskStatus}`]);
          handled += 1;
        } else wanted.push({ id, version });
      }
      if (!wanted.length) return true;
      const result = await api("PATCH", "/tasks/batch", { updates: wanted.map((w) => item(w.id, w.version)) });
      if (result.status !== 200 || !Array.isArray(result.answer?.results)) {
        groups.failed.items.push(...wanted.map((w) => [w.id, problemText(result)]));
        handled += wanted.length;
        failure = problemText(result);
        return false;
      }
      result.answer.results.forEach((r, i) => {
        const id = r.task_id ?? wanted[i].id;
        const detail = r.problem?.detail ?? "";
        if (r.status === 200) {
          const same = !r.deleted && r.task && String(r.task.version) === String(wanted[i].version);
          (same ? groups.unchanged : groups.done).items.push([id, ""]);
        } else if (r.status === 409) groups.finished.items.push([id, detail]);
        else if (r.status === 412) groups.conflict.items.push([id, detail]);
        else if (r.status === 404) groups.gone.items.push([id, detail]);
        else groups.failed.items.push([id, detail || String(r.status)]);
      });
      handled += wanted.length;
      return true;
    }

    let ok = true;
    if (chosenRows) {
      for (let i = 0; ok && !stop && i < chosenRows.length; i += BATCH) {
        const batch = chosenRows.slice(i, i + BATCH).map(([id, v]) => ({ id, version: v.version, status: v.status }));
        ok = await send(batch);
        show();
      }
    } else {
      // Every task the filter matches, a page of the API's list at a time, keyset-paged by its cursor.
      let url = `/tasks/?${matchingQuery(BATCH)}`;
      const met = new Set();
      while (ok && !stop && url) {
        const page = await api("GET", url);
        if (page.status !== 200) {
          failure = problemText(page);
          break;
        }
        const next = /<([^>]+)>;\s*rel="next"/.exec(page.headers.get("link") || "");
        url = next ? next[1] : null;
        if (!page.answer.length) break;
        const tasks = page.answer.filter((t) => t.id <= everyMatching.newest);
        // A task this page showed is sent as shown (a change since is refused as such); others as read.
        const sent = tasks.map((t) => ({ id: t.task_id, ...(shown.get(t.task_id) ?? { version: t.version, status: t.status }) }));
        for (const t of tasks) met.add(t.task_id);
        if (tasks.length) ok = await send(sent);
        show();
      }
      // Counted, or shown, when the dialog opened, and gone from the filter since (changed, or deleted):
      // each shown one is listed, and the others are told apart from tasks the walk has yet to send.
      if (ok && !stop && url === null) {
        for (const id of shown.keys()) {
          if (!met.has(id)) groups.left.items.push([id, ""]);
        }
        handled += groups.left.items.length;
        groups.left.unlisted = Math.max(0, total - handled); // the page did not show them: no id to list
        handled += groups.left.unlisted;
      }
    }
    show();
    stopButton.remove();
    const name = { cancel: "Cancel", retry: "Retry", delete: "Delete" }[action];
    title.textContent = `${name}: ${stop || failure ? "stopped" : "finished"}. ${number.format(groups.done.items.length)} done.`;
    title.tabIndex = -1;
    title.focus(); // the keyboard goes on from the outcome, not from the top of the page
    for (const button of bulk.querySelectorAll("button:not([data-bulk])")) button.disabled = false;
    updateBulk();
    refresh();
  }
}

// ---- /ui/tasks/{id}: the task now, its timeline, its actions ------------------------------------

function taskPage() {
  const taskId = body.dataset.task; // absent for a deleted task: nothing more can happen to it
  const actions = document.getElementById("actions");
  const message = document.getElementById("action-message");
  let stream = null;
  let finished = null; // following the feed for this task, once it has finished

  const history = () => document.getElementById("history");

  async function refreshNow() {
    const fresh = await fetchPage();
    if (!fresh) return;
    // The version picker follows the version shown, unless the reader has chosen another one meanwhile.
    const wasShown = document.getElementById("now").dataset.shownVersion;
    replaceIfChanged(document.getElementById("notices"), fresh.getElementById("notices"));
    morph(document.getElementById("now"), fresh.getElementById("now"));
    syncAttributes(history(), fresh.getElementById("history"), ["data-latest", "data-latest-status"]);
    syncText(fresh, "#history-count");
    syncKeyed(document.getElementById("timeline"), fresh.getElementById("timeline"), "data-version", (old, now) =>
      replaceIfChanged(old, now),
    );
    for (const id of ["timeline-newer", "timeline-older"]) replaceIfChanged(document.getElementById(id), fresh.getElementById(id));
    const picker = document.getElementById("version");
    const freshPicker = fresh.getElementById("version");
    const value = picker?.value === wasShown ? freshPicker?.value : picker?.value; // the choice it keeps
    if (picker?.tagName === "SELECT" && freshPicker?.tagName === "SELECT" && picker.options.length !== freshPicker.options.length) {
      picker.replaceChildren(...[...freshPicker.options].map((o) => document.importNode(o, true)));
      picker.value = value;
    } else if (picker && freshPicker && picker.tagName !== freshPicker.tagName) {
      // Past 500 versions the list becomes a number field: take the page's new one, keeping the choice.
      const replacement = document.importNode(freshPicker, true);
      replacement.value = value;
      picker.replaceWith(replacement);
    } else if (picker && freshPicker) {
      syncAttributes(picker, freshPicker, ["max"]);
      picker.value = value;
    }
    const freshActions = fresh.getElementById("actions");
    if (actions && freshActions) {
      syncAttributes(actions, freshActions, ["data-if-version"]);
      syncText(fresh, "#actions-now"); // a past version's page: the version the actions act on
      for (const button of actions.querySelectorAll("[data-action]")) {
        const now = freshActions.querySelector(`[data-action="${button.dataset.action}"]`);
        button.hidden = !now || now.hidden;
      }
    } else if (actions && !freshActions && history().dataset.latestStatus === "deleted") {
      // Deleted: nothing is left to do to it. The section stays for its message (this page's own
      // "Deleted.", or one saying so when the delete came from elsewhere). (A page without actions for
      // another reason, fetched for a read key's sign-in in another tab, changes none of this page's:
      // audit. Its notice says to reload, and an action of it is refused and says so.)
      actions.querySelector(".buttons").hidden = true;
      if (!message.textContent) message.textContent = "The task was deleted: nothing more can be done to it.";
    }
    watch();
  }
  const refresh = coalesce(refreshNow);

  // What the page follows, from the state it shows (each refresh ends here): while the task can still
  // change, its stream; once it has finished (its stream ends), the feed, which says when it is retried
  // or deleted; once deleted, nothing. (Audit: a task failed and deleted at once was followed by its
  // stream again and again, as "deleted" is no finished status, and its replay ends at the failure.)
  function watch() {
    if (!taskId) return;
    const status = history().dataset.latestStatus;
    if (status === "deleted" || FINISHED.has(status)) {
      stream?.close();
      stream = null;
      if (status === "deleted") {
        finished?.close();
        finished = null;
        setLive("ended", "Deleted");
      } else followFinished();
      return;
    }
    finished?.close();
    finished = null;
    if (stream) return;
    stream = live.follow(body.dataset.stream, {
      onOpen: refresh,
      onEvent: (type) => {
        if (FINISHING.has(type)) {
          // The server ends the stream after it (a retry's stream starts from the state the page shows).
          stream?.close();
          stream = null;
        }
        refresh();
      },
    });
  }

  // A finished task's stream has ended (it closes after a finished status). A retry or a delete made
  // elsewhere comes on the feed, which the page follows for this task's events: through the browser's
  // shared stream where it can, else its own (each event's task looked at here). Nothing is asked while
  // nothing happens (audit: asking the history every 400 ms made 150 requests a minute a page). As the
  // feed opens, the history is asked once for what the feed may have passed before the page followed it.
  async function newer() {
    const after = history().dataset.latest;
    const response = await fetch(`/tasks/${taskId}/history?after_version=${after}&limit=1`, {
      headers: { ...readHeaders(), ...REFRESH_FROM }, // a change made elsewhere, which a replica may lack
      cache: "no-store",
    });
    // 200 even for a deleted task. Any other answer says nothing: the page is fetched again to see.
    return !response.ok || (await response.json()).events.length > 0;
  }

  function followFinished() {
    setLive("live", "Live (finished task)");
    if (finished) return;
    finished = live.follow("/events/stream", {
      task: taskId,
      onOpen: () => {
        setLive("live", "Live (finished task)");
        // Through refresh's one queue: two fetches of the page at once could apply out of order.
        newer().then((yes) => yes && refresh(), () => refresh()); // not reached: look again as the page
      },
      // Shared: this task's events only, without their data. Own: every event of the feed, with its data
      // (only one that names the task is parsed).
      onEvent: (type, data) => {
        if (data === undefined || (data.includes(taskId) && JSON.parse(data).task_id === taskId)) refresh();
      },
    });
  }

  // Time travel: choosing a version, or clicking an entry of the timeline, shows the task at it.
  // On the form, not the field: the field is replaced when a list of versions becomes a number field.
  // A keyboard user stepping through versions with the arrow keys loads a page per step: the new page
  // puts the focus back on the picker, or it would fall to the page's start after each step.
  const PICKER_FOCUS = "tasktrail.version-picker";
  document.getElementById("version-form")?.addEventListener("change", (e) => {
    if (e.target.id !== "version") return;
    if (document.activeElement === e.target) sessionStorage.setItem(PICKER_FOCUS, "1");
    e.target.form.requestSubmit();
  });
  if (sessionStorage.getItem(PICKER_FOCUS)) {
    sessionStorage.removeItem(PICKER_FOCUS);
    document.getElementById("version")?.focus();
  }
  document.getElementById("timeline").addEventListener("click", (e) => {
    const entry = e.target.closest("li[data-version]");
    if (!entry || e.target.closest("a, button, input, select") || getSelection()?.toString()) return;
    entry.querySelector("a.ev-version")?.click();
  });

  watch();
  if (!actions) return;

  const dialog = document.getElementById("delete-confirm");
  let confirming = null; // the version the delete dialog asked about: a change while it is open is a conflict
  for (const button of actions.querySelectorAll("[data-action]")) {
    button.addEventListener("click", () => {
      if (button.dataset.action === "delete") {
        confirming = actions.dataset.ifVersion;
        dialog.returnValue = "";
        dialog.showModal();
      } else act(button.dataset.action, actions.dataset.ifVersion);
    });
  }
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "go") act("delete", confirming);
  });

  async function act(action, version) {
    const buttons = actions.querySelectorAll("button");
    buttons.forEach((b) => (b.disabled = true));
    message.dataset.kind = "working";
    message.textContent = { cancel: "Canceling…", retry: "Retrying…", delete: "Deleting…" }[action];
    let result;
    try {
      const headers = { "If-Match": `"${version}"` };
      result =
        action === "delete"
          ? await api("DELETE", `/tasks/${taskId}`, undefined, headers)
          : await api("PATCH", `/tasks/${taskId}`, { status: action === "cancel" ? "canceled" : "pending" }, headers);
    } catch {
      result = { status: 0, answer: { detail: "The service could not be reached; nothing was changed." } };
    }
    await refreshNow().catch(() => {});
    buttons.forEach((b) => (b.disabled = false));
    const now = history().dataset.latest;
    const nowStatus = history().dataset.latestStatus;
    if (result.status === 200) {
      message.dataset.kind = "ok";
      message.textContent = { cancel: "Canceled.", retry: "Retried: the task is pending again.", delete: "Deleted." }[action];
      if (action === "retry" && !stream) watch();
    } else if (result.status === 412) {
      message.dataset.kind = "conflict";
      message.textContent =
        `Conflict: nothing was changed. The task changed after this page showed version ${version}; ` +
        `it is now at version ${now}${nowStatus ? ` (${nowStatus})` : ""}. The page shows its latest state: ` +
        `check it, then try again if you still want to.`;
    } else if (result.status === 409) {
      message.dataset.kind = "conflict";
      message.textContent = `Not allowed: ${problemText(result)} The page shows the latest state.`;
    } else if (result.status === 404) {
      message.dataset.kind = "conflict";
      message.textContent = "The task was deleted meanwhile; the page shows its history.";
    } else {
      message.dataset.kind = "error";
      message.textContent = `Nothing was changed: ${problemText(result)}`;
    }
    // The button pressed may be gone now (Cancel on a canceled task): keep the keyboard here, on the outcome.
    if (document.activeElement === document.body || document.activeElement?.closest("[hidden]")) message.focus();
  }
}

// ---- /ui/events: the global feed -------------------------------------------------------------

function eventsPage() {
  const rows = document.getElementById("feed-rows");
  const template = document.getElementById("feed-row");
  const cap = Number(rows.dataset.cap);
  const note = document.getElementById("feed-note");
  const pause = document.getElementById("pause");
  let waiting = []; // raw JSON of events not yet shown, oldest first, at most `cap`
  let skipped = 0;
  let skippedPaused = 0; // of those, the ones that came while paused
  let beforePause = 0;
  // The page updates at a pace that shows every event for a while: each update adds about half the
  // rows kept at most (sooner when that many wait), so an event stays through two updates at least.
  // Faster than one update every FASTEST ms can show that way (2,000 events a second), it is flooded:
  // nobody reads rows that fast, so it updates every second with the newest events only.
  const FASTEST = 50;
  let pace = APPLY_EVERY;
  let flooded = false;
  let applied = performance.now();

  const time = (iso) => {
    const d = new Date(iso);
    const two = (n) => String(n).padStart(2, "0");
    return `${two(d.getUTCHours())}:${two(d.getUTCMinutes())}:${two(d.getUTCSeconds())}.${String(d.getUTCMilliseconds()).padStart(3, "0")}`;
  };
  // The text of the event's data as the stream sent it (the server writes a row the same way: routes.compact),
  // not parsed and written again: JSON.parse would make 50.0 into 50, round integers past 2^53, and list keys
  // such as "10" first.
  const rawData = (text) => {
    const key = '"data":';
    let depth = 0;
    let from = -1;
    for (let i = 0; i < text.length; i += 1) {
      const c = text[i];
      if (c === '"') {
        if (depth === 1 && from < 0 && text.startsWith(key, i)) {
          from = i + key.length;
          i = from - 1;
          continue;
        }
        for (i += 1; i < text.length && text[i] !== '"'; i += 1) if (text[i] === "\\") i += 1; // past the string
      } else if (c === "{" || c === "[") depth += 1;
      else if (c === "}" || c === "]") {
        depth -= 1;
        if (from >= 0 && depth === 1) return text.slice(from, i + 1);
      }
    }
    return JSON.stringify(JSON.parse(text).data); // not an object: never so
  };
  const compact = (text) => {
    if (text.length <= 160) return text;
    const characters = Array.from(text); // cut at 160 characters, as the server: never half an emoji
    return characters.length <= 160 ? text : `${characters.slice(0, 159).join("")}…`;
  };
  const field = (row, name) => row.querySelector(`[data-field="${name}"]`);

  function row(raw) {
    const e = JSON.parse(raw);
    const tr = template.content.firstElementChild.cloneNode(true);
    tr.dataset.taskId = e.task_id;
    tr.dataset.version = String(e.version);
    tr.dataset.type = e.type;
    field(tr, "time").textContent = time(e.occurred_at);
    field(tr, "time").dateTime = e.occurred_at;
    field(tr, "type").textContent = e.type;
    field(tr, "task").href = `/ui/tasks/${encodeURIComponent(e.task_id)}`;
    field(tr, "task-id").textContent = e.task_id;
    field(tr, "version").textContent = String(e.version);
    field(tr, "data").textContent = compact(rawData(raw));
    field(tr, "actor").textContent = e.metadata?.actor ?? "";
    field(tr, "request-id").textContent = e.metadata?.request_id ?? "";
    return tr;
  }

  const apply = coalesce(async () => {
    if (paused) {
      const count = waiting.length + skipped - beforePause;
      note.textContent = `${number.format(count)} new ${count === 1 ? "event" : "events"} while paused.`;
      return;
    }
    if (!waiting.length) return;
    const batch = waiting;
    waiting = [];
    const now = performance.now();
    const rate = (batch.length + skipped) / Math.max(now - applied, FASTEST); // events a millisecond
    applied = now;
    pace = Math.min(APPLY_EVERY, Math.max(FASTEST, cap / 2 / rate));
    // Events came and went unshown, and not in one burst: the rate over the (then long) interval says.
    flooded = skipped > 0 && rate * FASTEST > cap / 2;
    const fragment = document.createDocumentFragment();
    for (let i = batch.length - 1; i >= 0; i -= 1) fragment.append(row(batch[i]));
    rows.prepend(fragment);
    while (rows.rows.length > cap) rows.lastElementChild.remove();
    document.getElementById("feed-empty")?.remove();
    const why = !skippedPaused
      ? "faster than a page can show"
      : skippedPaused < skipped
        ? "faster than a page can show, or while paused"
        : "while paused";
    note.textContent = skipped ? `Showing the newest ${cap}; ${number.format(skipped)} more came ${why}.` : "";
    skipped = 0;
    skippedPaused = 0;
  }, () => (flooded ? 4 * APPLY_EVERY : waiting.length >= cap / 2 ? FASTEST : pace));

  live.follow(body.dataset.stream, {
    onEvent: (type, data) => {
      if (type === "snapshot") return;
      waiting.push(data);
      if (waiting.length > cap) {
        waiting = waiting.slice(-cap);
        skipped += 1;
        if (paused) skippedPaused += 1;
      }
      apply();
    },
  });

  pause.addEventListener("click", () => {
    paused = !paused;
    beforePause = waiting.length + skipped; // come before the click, not yet shown: not "while paused"
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    // While paused the note counts what comes, several times a second: shown, but not read out each time.
    note.setAttribute("aria-live", paused ? "off" : "polite");
    if (paused) setLive("paused", "Paused");
    else setLive("live", "Live");
    apply();
  });
}

const pages = { tasks: tasksPage, task: taskPage, events: eventsPage };
pages[body.dataset.page]?.();
