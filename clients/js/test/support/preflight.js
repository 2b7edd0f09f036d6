// Before any test: the pgpubsub binary is built and PostgreSQL answers.
import { existsSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { BIN, ADMIN_URL } from "./env.js";

if (!existsSync(BIN)) {
  console.error(`pgpubsub-client tests: no pgpubsub binary at ${BIN}.
Build it first, from the repository's root: cargo build
(or point PGPUBSUB_BIN at one).`);
  process.exit(1);
}
try {
  execFileSync("psql", ["-X", "-qAt", ADMIN_URL, "-c", "SELECT 1"], { stdio: ["ignore", "pipe", "pipe"] });
} catch (e) {
  console.error(`pgpubsub-client tests: PostgreSQL at ${ADMIN_URL} does not answer (psql: ${e.stderr || e.message}).
Start it, or set DATABASE_URL.`);
  process.exit(1);
}
