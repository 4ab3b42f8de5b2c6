// The demo's last step: the current matrix-js-sdk (43, on Node.js 22) deletes through the
// proxy as it deletes everywhere, with `deleteAccountData(type)`: a `PUT {}` after which
// the SDK waits, with no timeout of its own, for the deletion to come back over /sync.
//
//   node js_sdk_demo.mjs SDK_PROJECT_DIR      (MSC3391_DEMO={"baseUrl","user","password"})
//
// SDK_PROJECT_DIR holds the installed SDK (`npm ci` there: the demo uses tests/js43).
// Prints one line per call with how long it took; each call is bounded (20 s) here.

import { join } from "node:path";
import { pathToFileURL } from "node:url";

const quiet = () => {};
for (const level of ["log", "info", "debug", "trace", "warn"]) console[level] = quiet;
const sdkDir = process.argv[2];
const { ClientEvent, SyncState, createClient } = await import(
    pathToFileURL(join(sdkDir, "node_modules", "matrix-js-sdk", "lib", "index.js")).href
);
const demo = JSON.parse(process.env.MSC3391_DEMO ?? "");
const BOUND_MS = 20000;

function bounded(promise, what) {
    let timer;
    const expired = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`did not return within ${BOUND_MS} ms: ${what}`)), BOUND_MS);
    });
    return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

async function loggedIn() {
    const login = await createClient({ baseUrl: demo.baseUrl }).loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: demo.user },
        password: demo.password,
        initial_device_display_name: "matrix-js-sdk demo",
    });
    const client = createClient({
        baseUrl: demo.baseUrl,
        userId: login.user_id,
        deviceId: login.device_id,
        accessToken: login.access_token,
    });
    const ready = new Promise((resolve) =>
        client.on(ClientEvent.Sync, (state) => state === SyncState.Prepared && resolve()),
    );
    await client.startClient({ initialSyncLimit: 1 });
    await bounded(ready, "the first sync");
    return client;
}

async function timed(what, call) {
    const started = performance.now();
    await bounded(call(), what);
    process.stdout.write(`  ${what}: returned in ${Math.round(performance.now() - started)} ms\n`);
}

const type = "org.example.js-sdk-demo";
const first = await loggedIn();
let code = 0;
try {
    process.stdout.write(`matrix-js-sdk through the proxy, device ${first.getDeviceId()}:\n`);
    await timed(`setAccountData(${type})`, () => first.setAccountData(type, { colour: "green" }));
    await timed(`deleteAccountData(${type}), a live type`, () => first.deleteAccountData(type));
    await timed("deleteAccountData of a type never set", () =>
        first.deleteAccountData(`org.example.never-set.${Date.now()}`),
    );
    const later = await loggedIn(); // logged in after the delete: its store has no such type
    process.stdout.write(`a device that logged in afterwards, ${later.getDeviceId()}:\n`);
    process.stdout.write(`  getAccountData(${type}): ${JSON.stringify(later.getAccountData(type)?.getContent())}\n`);
    await timed(`deleteAccountData(${type}), deleted already`, () => later.deleteAccountData(type));
    later.stopClient();
} catch (e) {
    process.stdout.write(`  ${e.message}\n`);
    code = 1;
} finally {
    first.stopClient();
}
process.exit(code);
