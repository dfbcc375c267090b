#ifndef WALSHIP_CCRYPTO_SHIM_H
#define WALSHIP_CCRYPTO_SHIM_H
/* OpenSSL's libcrypto, for AES-256-GCM and random bytes. libcurl already loads it, so the
   agent gains no new shared library. */
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/err.h>
#endif
