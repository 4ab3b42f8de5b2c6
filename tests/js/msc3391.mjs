// matrix-js-sdk 37.5.0 against the proxy: two clients of one user, one deletes an account
// data type with the SDK's own `deleteAccountData`, the other's store must lose it.
//
//   MSC3391_JS_JOB=JOB node msc3391.mjs      (or: node msc3391.mjs JOB)
//
// JOB is a JSON object: {"baseUrl": "http://127.0.0.1:PORT", "userId": "@u:localhost",
// "devices": [{"accessToken": "...", "deviceId": "..."}, {...}], "type": "org.example.t",
// "timeoutMs": 30000}. One JSON object with the observations is written to standard
// output; everything the SDK logs goes to standard error. Run by
// tests/test_client_libraries_synapse.py, which makes the assertions.

// The SDK logs through `console`; keep standard output for the result alone. The SDK is
// imported only after this, because its logger binds the console methods when it loads.
const toStderr = console.error.bind(console);
for (const level of ["log", "info", "debug", "trace", "warn"]) console[level] = toStderr;

const sdk = await import("matrix-js-sdk");
const { ClientEvent, SyncState, createClient } = sdk;

const job = JSON.parse(process.argv[2] ?? process.env.MSC3391_JS_JOB ?? "");
const timeoutMs = job.timeoutMs ?? 30000;

function withTimeout(promise, what) {
    let timer;
    const expired = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
    });
    return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

/** Resolves with the first account data event of `type` that `predicate` accepts. */
function nextAccountData(client, type, predicate, what) {
    return withTimeout(
        new Promise((resolve) => {
            const listener = (event, previous) => {
                if (event.getType() !== type || !predicate(event)) return;
                client.off(ClientEvent.AccountData, listener);
                resolve({ content: event.getContent(), previousContent: previous?.getContent() ?? null });
            };
            client.on(ClientEvent.AccountData, listener);
        }),
        what,
    );
}

function prepared(client, name) {
    return withTimeout(
        new Promise((resolve, reject) => {
            client.on(ClientEvent.Sync, (state, _previous, data) => {
                if (state === SyncState.Prepared) resolve();
                if (state === SyncState.Error) reject(new Error(`${name}: sync error ${data?.error}`));
            });
        }),
        `${name} to reach PREPARED`,
    );
}

// Every request each client makes, as the SDK hands it to fetch.
const requests = { first: [], second: [] };

function makeClient(name, device) {
    return createClient({
        baseUrl: job.baseUrl,
        userId: job.userId,
        deviceId: device.deviceId,
        accessToken: device.accessToken,
        fetchFn: (resource, options) => {
            const url = new URL(resource instanceof Request ? resource.url : String(resource));
            requests[name].push({ method: options?.method ?? "GET", path: url.pathname });
            return fetch(resource, options);
        },
    });
}

const [first, second] = [makeClient("first", job.devices[0]), makeClient("second", job.devices[1])];
const result = {};
try {
    const ready = [prepared(first, "first"), prepared(second, "second")];
    await first.startClient({ initialSyncLimit: 1 });
    await second.startClient({ initialSyncLimit: 1 });
    await Promise.all(ready);

    result.supportsUnstableFeature = await first.doesServerSupportUnstableFeature("org.matrix.msc3391");

    // Set: the first client waits for its own remote echo; the second must see it too.
    const secondSeesIt = nextAccountData(second, job.type, (e) => Object.keys(e.getContent()).length > 0, "the set on the second client");
    await first.setAccountData(job.type, { set_by: "matrix-js-sdk" });
    result.secondAfterSet = (await secondSeesIt).content;
    result.firstStoreAfterSet = first.getAccountData(job.type)?.getContent() ?? null;

    // Delete with the SDK's own method; both clients' sync loops must report it.
    const deletedOnSecond = nextAccountData(second, job.type, (e) => Object.keys(e.getContent()).length === 0, "the deletion on the second client");
    const deletedOnFirst = nextAccountData(first, job.type, (e) => Object.keys(e.getContent()).length === 0, "the deletion on the first client");
    result.deleteResponse = (await first.deleteAccountData(job.type)) ?? null;
    const seenBySecond = await deletedOnSecond;
    await deletedOnFirst;
    result.secondDeletionEvent = seenBySecond.content;
    result.secondPreviousContent = seenBySecond.previousContent;
    // `undefined` (not in the store) is reported as the string "undefined".
    const stored = (client) => {
        const event = client.getAccountData(job.type);
        return event === undefined ? "undefined" : event.getContent();
    };
    result.secondStoreAfterDelete = stored(second);
    result.firstStoreAfterDelete = stored(first);
    result.requests = requests;
} catch (e) {
    result.error = String(e?.stack ?? e);
} finally {
    first.stopClient();
    second.stopClient();
}
process.stdout.write(JSON.stringify(result) + "\n");
// Timers of the stopped clients (keep-alive, retries) must not keep Node running.
process.exit(result.error ? 1 : 0);
