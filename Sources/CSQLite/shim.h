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
#endif
