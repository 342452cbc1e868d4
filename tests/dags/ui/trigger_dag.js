// Sign in to the Airflow UI in headless Debian chromium, open a DAG, fill its trigger form's params and
// trigger it. Prints one JSON line {"ok": true, "url": <page after triggering>}.
//   node trigger_dag.js BASE_URL USER PASSWORD DAG_ID '{"param": "value", ...}' [SCREENSHOT_DIR]
const { chromium } = require('playwright-core');

async function main() {
  const [base, user, password, dagId, paramsJson, shots] = process.argv.slice(2);
  const params = JSON.parse(paramsJson);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    page.setDefaultTimeout(90000);
    const shot = async (name) => { if (shots) await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true }); };

    await page.goto(`${base}/auth/login`);
    await page.locator('input[name="username"]').fill(user);
    await page.locator('input[name="password"]').fill(password);
    await page.getByRole('button', { name: 'Sign in' }).click();
    await page.waitForURL((u) => !u.pathname.startsWith('/auth'));

    await page.goto(`${base}/dags/${dagId}`);
    const trigger = page.getByRole('button', { name: 'Trigger Dag' });
    await trigger.waitFor();
    await shot('1-dag');
    await trigger.click();
    const dialog = page.getByRole('dialog');
    await dialog.getByText('Run Parameters').waitFor();
    for (const [name, value] of Object.entries(params)) {
      const field = dialog.locator(`#element_${name}`);
      await field.fill(String(value));
    }
    await shot('2-form');
    await dialog.getByRole('button', { name: 'Trigger', exact: true }).click();
    await dialog.waitFor({ state: 'detached' });
    await page.waitForTimeout(1000);
    await shot('3-triggered');
    console.log(JSON.stringify({ ok: true, url: page.url() }));
  } finally {
    await browser.close();
  }
}

main().catch((e) => { console.error(String(e && e.stack || e)); process.exit(1); });
