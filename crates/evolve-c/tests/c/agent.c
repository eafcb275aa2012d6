/* A C program with the agent: `evolve` commands (switch, commit, functions) reach its C
   switches and functions. Reads commands on stdin: "call" prints the state, "quit" ends. */
#include <evolve.h>

#include <unistd.h>

#include "common.h"

EVOLVE_SWITCH(int, level, 1, 0, 1, 2, 3);
EVOLVE_MULTIVERSE(int, scaled, (int x), (x), EVOLVE_VALUES(level, 0, 3)) { return level * x; }
EVOLVE_HOT(int, handler, (int x)) { return x; }

int main(void)
{
    EXPECT(evolve_start(), 0);
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "quit", 4) == 0)
            break;
        printf("level=%d scaled=%d committed=%d handler=%d\n", EVOLVE_GET(level), scaled(2),
               evolve_is_committed(scaled), handler(5));
        fflush(stdout);
    }
    return 0;
}
