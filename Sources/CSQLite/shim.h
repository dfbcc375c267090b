#ifndef WALSHIP_CSQLITE_SHIM_H
#define WALSHIP_CSQLITE_SHIM_H
#include <sqlite3.h>

/* SQLITE_TRANSIENT is a cast of -1 to a function pointer, which Swift cannot import. */
static inline sqlite3_destructor_type walship_sqlite_transient(void) { return SQLITE_TRANSIENT; }

/* sqlite3_file_control is fine, but sqlite3_db_config is variadic: expose the one use we need.
   `now` receives the setting as it is after the call. */
static inline int walship_sqlite_db_config_int(sqlite3 *db, int op, int value, int *now) {
    return sqlite3_db_config(db, op, value, now);
}
/* No lookaside buffer for this connection: the agent's connections make few and small
   allocations, and each buffer (about 120 KiB by default, every page of it written when it is
   set up) was much of an idle database's memory. Returns SQLITE_OK or an error. */
static inline int walship_sqlite_no_lookaside(sqlite3 *db) {
    return sqlite3_db_config(db, SQLITE_DBCONFIG_LOOKASIDE, (void *)0, 0, 0);
}

/* No page-cache memory allocated ahead of need (SQLite allocates 20 pages per connection in
   one block at its first read by default). Process-wide: call before SQLite is initialised. */
static inline int walship_sqlite_no_pagecache_prealloc(void) {
    return sqlite3_config(SQLITE_CONFIG_PAGECACHE, (void *)0, 0, 0);
}
#endif
