// Two @tursodatabase/sync replicas of one namespace, through turso-server:
// A pushes, B pulls and pushes, A pulls.  Prints A's rows as JSON.
// Usage: node sync_roundtrip.mjs <url> <token|-> <path prefix>
const { connect } = await import(process.env.TURSO_SYNC_JS);
const [url, token, prefix] = process.argv.slice(2);
const authToken = token === "-" ? undefined : token;
const a = await connect({ path: `${prefix}-a.db`, url, authToken });
await a.exec("create table t (x text)");
await a.exec("insert into t values ('node-a')");
await a.push();
const b = await connect({ path: `${prefix}-b.db`, url, authToken });
const seen = await (await b.prepare("select x from t")).all();
if (seen.length !== 1 || seen[0].x !== "node-a") {
  console.error(`replica B saw ${JSON.stringify(seen)}`);
  process.exit(1);
}
await b.exec("insert into t values ('node-b')");
await b.push();
await a.pull();
console.log(JSON.stringify(await (await a.prepare("select x from t order by x")).all()));
await a.close();
await b.close();
