import { fileURLToPath } from "node:url";
import { resolve } from "node:path";

const here = fileURLToPath(new URL(".", import.meta.url));

/** The gateway under test: the workspace's debug build unless PGPUBSUB_BIN says otherwise. */
export const BIN = process.env.PGPUBSUB_BIN ?? resolve(here, "../../../../target/debug/pgpubsub");

/** The PostgreSQL server the scratch databases are made on (as the Rust tests). */
export const ADMIN_URL = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";
