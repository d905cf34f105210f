// `npm pack` runs this so the packed package carries the proto it loads.
import { cpSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
cpSync(join(root, '..', '..', 'proto'), join(root, 'proto'), { recursive: true });
