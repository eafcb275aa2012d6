/* A multiversed function that lists a value outside its switch's domain: registering the
   program is refused with the cause, and the program keeps running its generic code. */
#include <evolve.h>

#include "common.h"

EVOLVE_SWITCH(int, level, 1, 0, 1, 2, 3);

EVOLVE_MULTIVERSE(int, scaled, (int x), (x), EVOLVE_VALUES(level, 1, 7)) { return level * x; }

int main(void)
{
    EXPECT(evolve_start(), -1);
    printf("error: %s\n", evolve_last_error());
    EXPECT(evolve_commit(), -1); /* refused again: nothing was registered */
    EXPECT(scaled(2), 2);
    printf("generic=ok\n");
    return 0;
}
