/*
 * turso-landlock: run a command confined by Landlock (Linux >= 5.13).
 *
 *   turso-landlock --probe
 *       print the kernel's Landlock ABI version and exit 0, or exit 3 if
 *       the kernel has no Landlock.
 *   turso-landlock [--rw FILE]... [--rwdir DIR]... [--tcp-bind PORT]
 *                  [--chdir DIR] [--parent PID] -- COMMAND [ARG]...
 *       exec COMMAND able to read and execute anything, to write only the
 *       FILEs given (read, write, truncate; each must exist) and beneath
 *       the DIRs given (everything); nothing else on the file system.
 *       From Landlock ABI 4 on, with --tcp-bind, it may bind that TCP port
 *       only and connect nowhere; from ABI 6 on, it may signal and reach
 *       abstract unix sockets only within its own domain.
 *       --chdir: run COMMAND in DIR.  --parent: run it in a session of its
 *       own (so a signal to the parent's process group is not its), and
 *       have the kernel SIGKILL it when PID, its parent, dies (or at once,
 *       if PID is already gone): what setsid(1) and setpriv(1) --pdeathsig
 *       would do, without their two execs.
 *
 * turso-server starts each tursodb child through it, so that whatever SQL
 * a client gets past the statement gate cannot write outside the
 * namespace's own files and scratch directory.  It execs: the pid stays
 * the command's.  Exit 2 on bad usage, 1 if the rules cannot be applied.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_landlock_create_ruleset
#define __NR_landlock_create_ruleset 444
#define __NR_landlock_add_rule 445
#define __NR_landlock_restrict_self 446
#endif

#define LANDLOCK_CREATE_RULESET_VERSION (1U << 0)
#define LANDLOCK_RULE_PATH_BENEATH 1
#define LANDLOCK_RULE_NET_PORT 2
#define ACCESS_NET_BIND_TCP (1ULL << 0)
#define ACCESS_NET_CONNECT_TCP (1ULL << 1)
#define SCOPE_ABSTRACT_UNIX_SOCKET (1ULL << 0)
#define SCOPE_SIGNAL (1ULL << 1)

#define ACCESS_EXECUTE (1ULL << 0)
#define ACCESS_WRITE_FILE (1ULL << 1)
#define ACCESS_READ_FILE (1ULL << 2)
#define ACCESS_READ_DIR (1ULL << 3)
#define ACCESS_REMOVE_DIR (1ULL << 4)
#define ACCESS_REMOVE_FILE (1ULL << 5)
#define ACCESS_MAKE_CHAR (1ULL << 6)
#define ACCESS_MAKE_DIR (1ULL << 7)
#define ACCESS_MAKE_REG (1ULL << 8)
#define ACCESS_MAKE_SOCK (1ULL << 9)
#define ACCESS_MAKE_FIFO (1ULL << 10)
#define ACCESS_MAKE_BLOCK (1ULL << 11)
#define ACCESS_MAKE_SYM (1ULL << 12)
#define ACCESS_REFER (1ULL << 13)    /* ABI 2 */
#define ACCESS_TRUNCATE (1ULL << 14) /* ABI 3 */

struct ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net; /* ABI 4 */
    uint64_t scoped;             /* ABI 6 */
};

struct net_port_attr {
    uint64_t allowed_access;
    uint64_t port;
};

struct path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

static int abi_version(void) {
    long abi = syscall(__NR_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
    return abi < 0 ? 0 : (int)abi;
}

static void usage(void) {
    fprintf(stderr, "usage: turso-landlock --probe | [--rw FILE]... [--rwdir DIR]... [--tcp-bind PORT] "
                    "-- COMMAND [ARG]...\n");
    exit(2);
}

static int add_rule(int ruleset, const char *path, uint64_t access) {
    struct path_beneath_attr rule = {.allowed_access = access};
    rule.parent_fd = open(path, O_PATH | O_CLOEXEC);
    if (rule.parent_fd < 0) {
        fprintf(stderr, "turso-landlock: %s: %s\n", path, strerror(errno));
        return -1;
    }
    long done = syscall(__NR_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule, 0);
    int saved = errno;
    close(rule.parent_fd);
    if (done < 0) {
        fprintf(stderr, "turso-landlock: rule for %s: %s\n", path, strerror(saved));
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--probe") == 0) {
        int abi = abi_version();
        if (abi < 1) {
            fprintf(stderr, "turso-landlock: the kernel has no Landlock (%s)\n", strerror(errno));
            return 3;
        }
        printf("%d\n", abi);
        return 0;
    }
    int command = -1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            command = i + 1;
            break;
        }
        if ((strcmp(argv[i], "--rw") == 0 || strcmp(argv[i], "--rwdir") == 0 ||
             strcmp(argv[i], "--tcp-bind") == 0 || strcmp(argv[i], "--chdir") == 0 ||
             strcmp(argv[i], "--parent") == 0) && i + 1 < argc) {
            i++;
            continue;
        }
        usage();
    }
    if (command < 0 || command >= argc)
        usage();

    int abi = abi_version();
    if (abi < 1) {
        fprintf(stderr, "turso-landlock: the kernel has no Landlock\n");
        return 1;
    }
    uint64_t read = ACCESS_EXECUTE | ACCESS_READ_FILE | ACCESS_READ_DIR;
    uint64_t file_write = ACCESS_WRITE_FILE | (abi >= 3 ? ACCESS_TRUNCATE : 0);
    uint64_t all = read | file_write | ACCESS_REMOVE_DIR | ACCESS_REMOVE_FILE | ACCESS_MAKE_CHAR |
                   ACCESS_MAKE_DIR | ACCESS_MAKE_REG | ACCESS_MAKE_SOCK | ACCESS_MAKE_FIFO |
                   ACCESS_MAKE_BLOCK | ACCESS_MAKE_SYM | (abi >= 2 ? ACCESS_REFER : 0);
    long bind_port = -1;
    for (int i = 1; i < command - 1; i += 2) {
        char *end;
        if (strcmp(argv[i], "--tcp-bind") == 0) {
            bind_port = strtol(argv[i + 1], &end, 10);
            if (*end || bind_port < 1 || bind_port > 65535)
                usage();
        } else if (strcmp(argv[i], "--chdir") == 0) {
            if (chdir(argv[i + 1]) < 0) {
                fprintf(stderr, "turso-landlock: cannot enter %s: %s\n", argv[i + 1], strerror(errno));
                return 1;
            }
        } else if (strcmp(argv[i], "--parent") == 0) {
            long parent = strtol(argv[i + 1], &end, 10);
            if (*end || parent < 1)
                usage();
            setsid(); /* fails only for a group leader, which a fresh child is not */
            if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0) {
                fprintf(stderr, "turso-landlock: cannot set the parent-death signal: %s\n", strerror(errno));
                return 1;
            }
            if (getppid() != (pid_t)parent) {
                fprintf(stderr, "turso-landlock: parent %ld is gone\n", parent);
                return 1; /* it died before the signal was set */
            }
        }
    }
    struct ruleset_attr attr = {.handled_access_fs = all};
    size_t attr_size = sizeof(attr.handled_access_fs);
    if (abi >= 4 && bind_port > 0) {
        attr.handled_access_net = ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP;
        attr_size = offsetof(struct ruleset_attr, scoped);
    }
    if (abi >= 6) {
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL;
        attr_size = sizeof(attr);
    }
    int ruleset = (int)syscall(__NR_landlock_create_ruleset, &attr, attr_size, 0);
    if (ruleset < 0) {
        fprintf(stderr, "turso-landlock: cannot create a ruleset: %s\n", strerror(errno));
        return 1;
    }
    if (add_rule(ruleset, "/", read) < 0)
        return 1;
    if (attr.handled_access_net) {
        struct net_port_attr port = {.allowed_access = ACCESS_NET_BIND_TCP, .port = (uint64_t)bind_port};
        if (syscall(__NR_landlock_add_rule, ruleset, LANDLOCK_RULE_NET_PORT, &port, 0) < 0) {
            fprintf(stderr, "turso-landlock: rule for port %ld: %s\n", bind_port, strerror(errno));
            return 1;
        }
    }
    for (int i = 1; i < command - 1; i += 2) {
        if (strcmp(argv[i], "--tcp-bind") == 0 || strcmp(argv[i], "--chdir") == 0 ||
            strcmp(argv[i], "--parent") == 0)
            continue;
        /* A rule on a file may name only rights on files. */
        uint64_t access = strcmp(argv[i], "--rw") == 0 ? ACCESS_READ_FILE | file_write : all;
        if (add_rule(ruleset, argv[i + 1], access) < 0)
            return 1;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || syscall(__NR_landlock_restrict_self, ruleset, 0) < 0) {
        fprintf(stderr, "turso-landlock: cannot restrict itself: %s\n", strerror(errno));
        return 1;
    }
    close(ruleset);
    execv(argv[command], argv + command);
    fprintf(stderr, "turso-landlock: %s: %s\n", argv[command], strerror(errno));
    return 127;
}
