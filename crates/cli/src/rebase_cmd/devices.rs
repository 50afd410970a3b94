//! The device table of the rebase VM: FILE writable as device 0, then the old chain,
//! then the new chain, all read-only; and how a guest error about each device begins.

use instar_abi::{ChainImage, Format};

use super::cmd::{Cmd, Role};
use crate::chain::{self, Opened};
use crate::failure::Failure;
use crate::files::ImageFile;
use crate::guest::Device;

/// The files the rebase VM gets, in device order.
pub struct DeviceTable<'a> {
    pub devices: Vec<Device<'a>>,
    pub sizes: Vec<u64>,
    /// `prefixes[dev]`: how a guest error about device `dev` begins.
    pub prefixes: Vec<String>,
    pub old_chain: Vec<ChainImage>,
    pub new_chain: Vec<ChainImage>,
}

/// Number the devices: `overlay`, then `old` (the old chain), then `new` (the new
/// backing and its chain, with their formats).
pub fn assemble<'a>(
    cmd: &Cmd,
    overlay: &'a ImageFile,
    old: &'a [Opened],
    new: (&'a [ImageFile], &'a [Format]),
) -> Result<DeviceTable<'a>, Failure> {
    let mut table = DeviceTable {
        devices: vec![Device {
            file: &overlay.file,
            writable: true,
        }],
        sizes: vec![overlay.len],
        prefixes: vec![cmd.prefix(Role::Overlay)],
        old_chain: Vec::new(),
        new_chain: Vec::new(),
    };
    for (k, o) in old.iter().enumerate() {
        let prefix = chain::level_prefix(&cmd.prefix(Role::Overlay), k + 1);
        let entry = table.attach(&o.image, o.format, prefix)?;
        table.old_chain.push(entry);
    }
    let (images, formats) = new;
    for (j, (image, &format)) in images.iter().zip(formats).enumerate() {
        let prefix = chain::level_prefix(&cmd.prefix(Role::NewBacking), j);
        let entry = table.attach(image, format, prefix)?;
        table.new_chain.push(entry);
    }
    Ok(table)
}

impl<'a> DeviceTable<'a> {
    /// Add a read-only device; its entry for a chain of the request.
    fn attach(
        &mut self,
        image: &'a ImageFile,
        format: Format,
        prefix: String,
    ) -> Result<ChainImage, Failure> {
        // At most 1 + 2 × MAX_CHAIN devices; the sandbox takes 64.
        let dev = u8::try_from(self.devices.len())
            .map_err(|_| Failure::plain("internal error: too many devices"))?;
        self.devices.push(Device {
            file: &image.file,
            writable: false,
        });
        self.sizes.push(image.len);
        self.prefixes.push(prefix);
        Ok(ChainImage { dev, format })
    }
}
